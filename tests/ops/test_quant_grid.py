import itertools

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.quant_grid import compute_grid, round_to_grid_
from ppq_lightning.ops.reconstruction import relative_weight_error
from tests.helpers import float_copy_sizes


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"),
    list(itertools.product([2, 3, 4, 8], [None, 4, 16], [False, True])),
)
def test_grid_levels_zero_and_rounding_error(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(6, 32)
    grid = compute_grid(w, bits, group_size, symmetric)
    q = grid.quantize(w)
    gs = group_size or 32
    # at most 2**bits distinct values in every row group, integer codes within range
    for row in range(6):
        for start in range(0, 32, gs):
            assert q[row, start : start + gs].unique().numel() <= 2**bits
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 2**bits - 1
    # zero is exactly representable on every grid
    assert torch.equal(grid.fake_quantize(torch.zeros_like(w)), torch.zeros_like(w))
    # inside the range, the round-trip error is at most half a step (brute force over levels)
    deq = grid.fake_quantize(w)
    step = grid.scale.repeat_interleave(gs, dim=1)
    levels = torch.arange(2**bits, dtype=torch.float32)
    zero = grid.zero.repeat_interleave(gs, dim=1)
    candidates = step.unsqueeze(-1) * (levels - zero.unsqueeze(-1))  # (rows, cols, levels)
    nearest = (candidates - w.unsqueeze(-1)).abs().min(dim=-1).values
    inside = (w >= candidates.min(-1).values) & (w <= candidates.max(-1).values)
    assert torch.all((deq - w).abs()[inside] <= step[inside] / 2 + 1e-6)
    assert torch.allclose((deq - w).abs(), nearest, atol=1e-6)


def test_quantizing_twice_is_idempotent():
    w = torch.randn(4, 16)
    grid = compute_grid(w, 3)
    once = grid.fake_quantize(w)
    assert torch.equal(grid.fake_quantize(once), once)
    assert grid.off_grid_distance(once).max() < 1e-5


def test_all_zero_rows_are_representable():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    grid = compute_grid(w, 4)
    assert torch.isfinite(grid.scale).all() and (grid.scale > 0).all()
    assert torch.equal(grid.fake_quantize(w)[0], torch.zeros(8))


@pytest.mark.parametrize("bits", [1, 9, 16, 4.0, True])
def test_bits_outside_range(bits):
    with pytest.raises(PPQConfigError, match="bits"):
        compute_grid(torch.randn(2, 8), bits)


@pytest.mark.parametrize("group_size", [3, 0, -4])
def test_group_size_must_divide(group_size):
    with pytest.raises(PPQConfigError, match="group_size"):
        compute_grid(torch.randn(2, 8), 4, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group_size", "symmetric"), [(None, False), (8, True)])
def test_round_to_grid_by_row_slices_equals_rounding_the_whole_matrix(dtype, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(37, 32).to(dtype)
    grid = compute_grid(w, 4, group_size, symmetric)
    whole = grid.fake_quantize(w)
    sliced = w.clone()
    got, error = round_to_grid_(sliced, 4, group_size, symmetric, rows=5)  # 8 slices, one short
    assert torch.equal(got.scale, grid.scale) and torch.equal(got.zero, grid.zero)
    assert torch.equal(sliced, whole.to(dtype))
    assert error == pytest.approx(relative_weight_error(w, whole), rel=1e-5)


def test_round_to_grid_holds_float32_temporaries_of_one_slice_only(monkeypatch):
    # the 70B MLP weight's case, scaled down: 4096 x 256 in bf16, rounded 64 rows at a time
    w = torch.randn(4096, 256).to(torch.bfloat16)
    sizes = float_copy_sizes(monkeypatch)
    round_to_grid_(w, 4, rows=64)
    assert sizes and max(sizes) == 64 * 256
