"""Hessian accumulation: the running 2 X^T X / N, in float32 or float64."""

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.hessian import accumulate_hessian, whitening_factor


def _accumulate(chunks, dtype):
    h, n = None, 0
    for x in chunks:
        h, n = accumulate_hessian(h, x, n, dtype)
    return h, n


def _batches(seed=0, n_batches=24, rows=64, cols=48):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    x = torch.randn(n_batches * rows, cols, generator=g) @ mix
    x[:, 3] *= 300  # a massive-activation feature, as in real LLMs
    return x, list(x.split(rows))


def test_the_running_mean_is_2xtx_over_n():
    x, chunks = _batches()
    exact = 2 * x.double().T @ x.double() / len(x)
    for dtype in (torch.float32, torch.float64):
        h, n = _accumulate(chunks, dtype)
        assert h.dtype == dtype and n == len(x)
        torch.testing.assert_close(h.double(), exact, rtol=1e-5, atol=1e-3)


def test_float64_sums_do_not_depend_on_the_order_or_grouping_of_batches():
    x, chunks = _batches()
    in_order, _ = _accumulate(chunks, torch.float64)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled, _ = _accumulate([chunks[i] for i in order], torch.float64)
    regrouped, _ = _accumulate(list(x.split(96)), torch.float64)
    # what the solvers get: the float32 rounding of the sum
    assert torch.equal(in_order.float(), shuffled.float())
    assert torch.equal(in_order.float(), regrouped.float())


def test_whitening_factor_is_the_cholesky_factor_of_the_damped_hessian():
    x, _ = _batches()
    h, _ = accumulate_hessian(None, x, 0)
    s = whitening_factor(h, damp=0.01)
    damped = h.double() + 0.01 * torch.diag(h).double().mean() * torch.eye(h.shape[0])
    assert s.dtype == torch.float64 and torch.equal(s, s.tril())
    torch.testing.assert_close(s @ s.T, damped)


def test_whitening_factor_of_a_singular_hessian():
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0  # a dead input
    x[:, 4] = x[:, 3]  # a duplicated one
    h, _ = accumulate_hessian(None, x, 0)
    s = whitening_factor(h, damp=1e-6)
    assert torch.isfinite(s).all() and (torch.diagonal(s) > 0).all()
    with pytest.raises(PPQConfigError, match="damp=0"):
        whitening_factor(h, damp=0)


def test_a_hessian_error_quotes_the_damp_given_and_every_damping_tried():
    # it quoted "damp=10" (the last damping tried) for a user's damp=0.01 (#27)
    from ppq_lightning.ops.hessian import HessianError, prepare_hessian

    h = torch.full((3, 3), float("inf"))
    with pytest.raises(HessianError, match=r"neither with damp=0\.01 \(as given\)") as info:
        prepare_hessian(h, damp=0.01)
    assert "0.1, 1, 10" in str(info.value) and "9 NaN or infinite" in str(info.value)
    with pytest.raises(HessianError, match=r"with damp=100 \(as given; above 10, so not raised\)"):
        whitening_factor(h, damp=100)
