import itertools

import pytest
import torch
from torch import nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.basis_sharing import factor_params, rank_for_ratio, shared_basis
from ppq_lightning.sharing import SharedBasisLinear


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
    factors = shared_basis(weights, 4)
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
