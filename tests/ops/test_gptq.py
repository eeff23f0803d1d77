"""GPTQ (ppq_lightning.ops.gptq) on tiny matrices: RTN as its diagonal-Hessian special case, the
grid its result lies on, fixed masks, act-order, lazy blocks and argument errors."""

import re

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.gptq import gptq
from ppq_lightning.ops.quant_grid import compute_grid

ROWS, COLS = 6, 16


def _weight(rows=ROWS, cols=COLS, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _correlated_hessian(cols=COLS, n=64, seed=1):
    """``2 X^T X / n`` of correlated inputs, computed directly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return 2 * x.T @ x / n


def _quadratic_loss(w, q, h):
    """``tr((W - Q) H (W - Q)^T)`` in float64."""
    d = (w - q).double()
    return float(torch.trace(d @ h.double() @ d.T))


def _assert_on_grid(weight, grid):
    """Every entry is ``scale * (k - zero)`` for an integer code ``k`` in [0, 2**bits - 1]."""
    cols = weight.shape[1]
    scale = grid.scale.repeat_interleave(cols // grid.scale.shape[1], dim=1)
    zero = grid.zero.repeat_interleave(cols // grid.zero.shape[1], dim=1)
    codes = weight / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= grid.maxq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_with_a_scaled_identity_hessian_equals_rtn_on_the_min_max_grid(
    bits, group_size, symmetric
):
    # H = c I: the factor of H^-1 is diagonal, so no error reaches another column
    w = _weight()
    result = gptq(w, 3.0 * torch.eye(COLS), bits, group_size, symmetric, block_size=4)
    rtn_grid = compute_grid(w, bits, group_size, symmetric)
    assert torch.equal(result.weight, rtn_grid.fake_quantize(w))
    assert torch.equal(result.grid.scale, rtn_grid.scale)
    assert torch.equal(result.grid.zero, rtn_grid.zero)
    assert (result.grid.bits, result.grid.group_size, result.grid.symmetric) == (
        bits,
        group_size,
        symmetric,
    )


def test_gptq_loss_with_a_scaled_identity_hessian_is_half_the_damped_squared_error():
    # H = c I damped by d: U_ii = 1 / sqrt(c (1 + d)), so sum err^2 / 2 = c (1 + d) ||W - Q||^2 / 2
    w, c, damp = _weight(), 3.0, 0.01
    result = gptq(w, c * torch.eye(COLS), 3, damp=damp)
    rtn = compute_grid(w, 3).fake_quantize(w)
    expected = c * (1 + damp) / 2 * float((w - rtn).double().pow(2).sum())
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert (result.damp, result.retries) == (damp, 0)


@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_act_order_with_a_distinct_diagonal_hessian_still_equals_rtn(group_size):
    # a diagonal H of distinct entries permutes the walk but still propagates no error; the
    # result must come back in the natural column order
    w = _weight()
    h = torch.diag(torch.rand(COLS, generator=torch.Generator().manual_seed(2)) + 0.5)
    result = gptq(w, h, 3, group_size, act_order=True, block_size=3)
    rtn_grid = compute_grid(w, 3, group_size)
    assert torch.equal(result.weight, rtn_grid.fake_quantize(w))
    assert torch.equal(result.grid.scale, rtn_grid.scale)


@pytest.mark.parametrize("group_size", [None, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_result_lies_on_the_returned_grid(group_size, symmetric, act_order):
    w = _weight()
    result = gptq(w, _correlated_hessian(), 3, group_size, symmetric, act_order, block_size=5)
    assert result.weight.dtype == torch.float32
    assert result.weight.shape == w.shape
    assert result.grid.scale.shape == (ROWS, COLS // (group_size or COLS))
    _assert_on_grid(result.weight, result.grid)
    # rounding the result onto its own grid changes nothing (up to float rounding)
    assert torch.allclose(result.grid.fake_quantize(result.weight), result.weight, atol=1e-5)


def test_gptq_act_order_with_groups_uses_group_grids_of_the_original_weights():
    # with act-order the group grids are computed up front, from the unquantized weights
    w = _weight()
    result = gptq(w, _correlated_hessian(), 4, group_size=4, act_order=True)
    expected = compute_grid(w, 4, group_size=4)
    assert torch.equal(result.grid.scale, expected.scale)
    assert torch.equal(result.grid.zero, expected.zero)
    _assert_on_grid(result.weight, result.grid)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_with_a_mask_makes_exactly_the_pruned_entries_zero(act_order, group_size):
    w = _weight()  # not pre-masked: the pruned entries are nonzero on input
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    result = gptq(
        w, _correlated_hessian(), 4, group_size, act_order=act_order, mask=mask, block_size=5
    )
    assert torch.all(result.weight[~mask] == 0)
    _assert_on_grid(result.weight, result.grid)


def test_gptq_with_a_mask_and_a_scaled_identity_hessian_is_masked_rtn():
    w = _weight()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    result = gptq(w, torch.eye(COLS), 4, mask=mask)
    assert torch.equal(result.weight, compute_grid(w, 4).fake_quantize(w) * mask)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"), [(2, None, False), (3, None, True), (3, 4, False)]
)
def test_gptq_quadratic_loss_is_at_most_rtn_for_a_correlated_hessian(bits, group_size, symmetric):
    w, h = _weight(), _correlated_hessian()
    result = gptq(w, h, bits, group_size, symmetric)
    rtn = compute_grid(w, bits, group_size, symmetric).fake_quantize(w)
    assert _quadratic_loss(w, result.weight, h) <= _quadratic_loss(w, rtn, h)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    ("group_size", "block_sizes"), [(None, (1, 2, 3, 5)), (4, (1, 2, 4, 8)), (8, (2, 4, 16))]
)
def test_gptq_block_size_does_not_change_the_result(act_order, group_size, block_sizes):
    w, h = _weight(), _correlated_hessian()
    lazy = gptq(w, h, 4, group_size, act_order=act_order, block_size=128)
    for block_size in block_sizes:
        eager = gptq(w, h, 4, group_size, act_order=act_order, block_size=block_size)
        torch.testing.assert_close(eager.weight, lazy.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eager.grid.scale, lazy.grid.scale, atol=1e-6, rtol=1e-5)
        assert eager.loss == pytest.approx(lazy.loss, rel=1e-4)


@pytest.mark.parametrize("block_size", [3, 5])
def test_gptq_block_size_does_not_change_the_result_when_groups_straddle_blocks(block_size):
    w, h = _weight(), _correlated_hessian()
    reference = gptq(w, h, 4, group_size=4, block_size=1)  # every column its own block
    straddling = gptq(w, h, 4, group_size=4, block_size=block_size)
    torch.testing.assert_close(straddling.grid.scale, reference.grid.scale, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(straddling.weight, reference.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_uses_an_existing_grid_as_given(group_size):
    w = _weight()
    grid = compute_grid(2 * w, 3, group_size)  # wider than w's own min-max grid
    scale, zero = grid.scale.clone(), grid.zero.clone()
    # bits and group_size are ignored with a grid (even values that would be rejected)
    result = gptq(w, torch.eye(COLS), 99, group_size=5, grid=grid)
    assert torch.equal(result.grid.scale, scale) and torch.equal(result.grid.zero, zero)
    assert (result.grid.bits, result.grid.group_size) == (3, group_size)
    assert torch.equal(grid.scale, scale) and torch.equal(grid.zero, zero)  # not modified
    assert torch.equal(result.weight, grid.fake_quantize(w))
    correlated = gptq(w, _correlated_hessian(), 4, grid=grid)
    assert torch.equal(correlated.grid.scale, scale)
    _assert_on_grid(correlated.weight, grid)


def test_gptq_does_not_modify_its_inputs():
    w, h = _weight(), _correlated_hessian()
    w_before, h_before = w.clone(), h.clone()
    gptq(w, h, 3, group_size=4, act_order=True)
    assert torch.equal(w, w_before) and torch.equal(h, h_before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits=1 is not allowed: expected an integer from 2 to 8."),
        ({"bits": 16}, "bits=16 is not allowed: expected an integer from 2 to 8."),
        ({"bits": True}, "bits=True is not allowed"),
        ({"bits": 4, "group_size": 5}, "group_size=5 is not allowed: expected a divisor of"),
        ({"bits": 4, "group_size": 0}, "group_size=0 is not allowed"),
        ({"bits": 4, "block_size": 0}, "block_size=0 is not allowed"),
        ({"bits": 4, "damp": -0.1}, "damp=-0.1 is not allowed"),
    ],
)
def test_gptq_rejects_bad_arguments(kwargs, message):
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        gptq(_weight(), _correlated_hessian(), **kwargs)


def test_gptq_rejects_a_hessian_of_the_wrong_shape():
    with pytest.raises(PPQConfigError, match=re.escape("H=(8, 8) is not allowed")):
        gptq(_weight(), torch.eye(8), 4)


def test_gptq_rejects_a_weight_that_is_not_2d():
    with pytest.raises(PPQConfigError, match=re.escape("W=(16,) is not allowed")):
        gptq(torch.randn(COLS), torch.eye(COLS), 4)


def test_gptq_rejects_a_mask_of_the_wrong_shape():
    mask = torch.ones(ROWS, COLS - 1, dtype=torch.bool)
    with pytest.raises(PPQConfigError, match=re.escape("mask=(6, 15) is not allowed")):
        gptq(_weight(), torch.eye(COLS), 4, mask=mask)
