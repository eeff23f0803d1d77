import itertools

import pytest
import torch
from torch import nn

from ppq_lightning.edits.sharing import SharedBasisLinear
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.basis_sharing import factor_params, rank_for_ratio, shared_basis
from ppq_lightning.ops.hessian import accumulate_hessian, whitening_factor


def _weights(g: int = 3, out: int = 6, inp: int = 10, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(out, inp, generator=gen) for _ in range(g)]


def test_error_falls_strictly_as_rank_grows():
    weights = _weights()  # stack (18, 10): rank up to 10
    totals = []
    for rank in range(1, 11):
        factors = shared_basis(weights, rank)
        residual = sum(
            (w - c @ factors.basis).pow(2).sum().item()
            for w, c in zip(weights, factors.coefficients, strict=True)
        )
        totals.append(residual / sum(w.pow(2).sum().item() for w in weights))
    assert all(a > b for a, b in itertools.pairwise(totals))
    assert totals[-1] < 1e-10


def test_matches_the_truncated_svd_of_the_stack_and_shares_one_basis():
    weights = _weights()
    factors = shared_basis(weights, 4, split="coefficients")
    assert factors.basis.shape == (4, 10)
    assert [c.shape for c in factors.coefficients] == [(6, 4)] * 3
    assert torch.allclose(factors.basis @ factors.basis.T, torch.eye(4), atol=1e-5)
    stack = torch.cat(weights)
    approx = torch.cat([c @ factors.basis for c in factors.coefficients])
    s = torch.linalg.svdvals(stack)
    # Eckart-Young: the residual is the energy of the dropped singular values
    assert (stack - approx).pow(2).sum() == pytest.approx(s[4:].pow(2).sum().item(), rel=1e-4)
    for w, c, error in zip(weights, factors.coefficients, factors.relative_errors, strict=True):
        assert error == pytest.approx(
            ((w - c @ factors.basis).pow(2).sum() / w.pow(2).sum()).item()
        )


def test_parameter_count_and_rank_for_ratio():
    g, out, inp = 4, 6, 10
    assert factor_params(3, inp, [out] * g) == 3 * (inp + g * out)
    for ratio in (0.1, 0.25, 0.5, 0.9):
        k = rank_for_ratio(ratio, g, out, inp)
        assert factor_params(k, inp, [out] * g) <= ratio * g * out * inp
        assert factor_params(k + 1, inp, [out] * g) > ratio * g * out * inp
    assert rank_for_ratio(0.5, 2, 64, 64) == 21  # floor(0.5 * 8192 / 192)


def test_full_rank_layers_reproduce_the_dense_outputs():
    torch.manual_seed(0)
    dense = [nn.Linear(10, 6) for _ in range(3)]
    factors = shared_basis([m.weight.detach() for m in dense], 10)  # min(10, 18)
    basis = nn.Linear(10, 10, bias=False)
    basis.weight.data.copy_(factors.basis)
    shared = []
    for m, c in zip(dense, factors.coefficients, strict=True):
        coefficients = nn.Linear(10, 6)
        coefficients.weight.data.copy_(c)
        coefficients.bias.data.copy_(m.bias.data)
        shared.append(SharedBasisLinear(basis, coefficients, "g"))
    x = torch.randn(5, 10)
    for m, s in zip(dense, shared, strict=True):
        assert torch.allclose(s(x), m(x), atol=1e-5)
    model = nn.ModuleList(shared)
    n_params = sum(p.numel() for p in model.parameters())  # the basis once
    assert n_params == factor_params(10, 10, [6] * 3) + 3 * 6


@pytest.mark.parametrize(("rank", "match"), [(0, "rank=0"), (11, "rank=11 .*from 1 to 10")])
def test_rank_out_of_range(rank, match):
    with pytest.raises(PPQConfigError, match=match):
        shared_basis(_weights(), rank)


def test_input_dimensions_must_agree():
    with pytest.raises(PPQConfigError, match="one `in`"):
        shared_basis([torch.randn(4, 8), torch.randn(4, 9)], 2)


def _group_inputs(g: int = 3, inp: int = 10, n: int = 200, seed: int = 1) -> list[torch.Tensor]:
    """Correlated inputs with very unequal feature scales, one set per layer of the group."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1.5, inp)
    return [
        (torch.randn(n, inp, generator=gen) @ torch.randn(inp, inp, generator=gen)) * scales
        for _ in range(g)
    ]


def _whitening(xs: list[torch.Tensor]) -> torch.Tensor:
    h, n = None, 0
    for x in xs:
        h, n = accumulate_hessian(h, x, n)
    return whitening_factor(h, damp=1e-9)


def _output_error(weights, factors, xs) -> float:
    return sum(
        float(((w - c @ factors.basis) @ x.T).pow(2).sum())
        for w, c, x in zip(weights, factors.coefficients, xs, strict=True)
    )


@pytest.mark.parametrize("rank", [2, 4, 7])
def test_whitening_lowers_the_output_error_of_the_group(rank):
    weights, xs = _weights(), _group_inputs()
    plain = shared_basis(weights, rank)
    whitened = shared_basis(weights, rank, _whitening(xs))
    assert _output_error(weights, whitened, xs) < 0.9 * _output_error(weights, plain, xs)
    # its reported errors are in output space: ||(W - CB) S||^2 / ||W S||^2
    s = _whitening(xs).float()
    for w, c, error in zip(weights, whitened.coefficients, whitened.relative_errors, strict=True):
        expected = ((w - c @ whitened.basis) @ s).pow(2).sum() / (w @ s).pow(2).sum()
        assert error == pytest.approx(float(expected), rel=1e-4)


def test_whitening_is_optimal_for_the_stacked_objective():
    """||(W_stack - C B) S||_F^2 equals the sum of the discarded squared singular values."""
    weights, xs = _weights(), _group_inputs()
    s = _whitening(xs)
    factors = shared_basis(weights, 4, s)
    stack = torch.cat(weights) - torch.cat(factors.coefficients) @ factors.basis
    residual = float((stack.double() @ s).pow(2).sum())
    assert residual == pytest.approx(
        float(factors.singular_values[4:].double().pow(2).sum()), rel=1e-4
    )


def test_identity_whitening_is_the_plain_svd():
    weights = _weights()
    plain, eye = shared_basis(weights, 5), shared_basis(weights, 5, torch.eye(10))
    torch.testing.assert_close(
        torch.cat(eye.coefficients) @ eye.basis, torch.cat(plain.coefficients) @ plain.basis
    )
    assert eye.relative_errors == pytest.approx(plain.relative_errors, rel=1e-5)


def test_whitening_shape_must_match_the_input_width():
    with pytest.raises(PPQConfigError, match=r"whitening=\(9, 9\).*\(10, 10\)"):
        shared_basis(_weights(), 3, torch.eye(9))


def test_balanced_split_has_the_same_product_and_equal_factor_scales():
    weights = _weights()
    plain = shared_basis(weights, 4, split="coefficients")
    balanced = shared_basis(weights, 4)  # the default
    torch.testing.assert_close(
        torch.cat(balanced.coefficients) @ balanced.basis,
        torch.cat(plain.coefficients) @ plain.basis,
        rtol=1e-4,
        atol=1e-5,
    )
    root = plain.singular_values[:4].sqrt()
    torch.testing.assert_close(balanced.basis.norm(dim=1), root, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.cat(balanced.coefficients).norm(dim=0), root, rtol=1e-4, atol=1e-6
    )
    assert balanced.relative_errors == pytest.approx(plain.relative_errors, rel=1e-4)
    with pytest.raises(PPQConfigError, match=r"split='halves'.*balanced, coefficients"):
        shared_basis(weights, 4, split="halves")
