"""A grid held by a bf16 or fp16 weight: a weight is on the grid when it is a float32 grid value
rounded once to its dtype; its code is read back exactly wherever two levels do not round to the
same value, and the levels that do are counted (``indistinct_levels``), checked by brute force."""

import pytest
import torch

from ppq_lightning.ops.quant_grid import QuantGrid, compute_grid, indistinct_levels

LOW = (torch.bfloat16, torch.float16)


def _grid_and_codes(bits: int, symmetric: bool, positive: bool = False):
    generator = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=generator)
    w = w.abs() if positive else w  # all-positive rows: zero point 0, |k - zero| up to 2**bits - 1
    grid = compute_grid(w, bits, symmetric=symmetric)
    codes = torch.randint(0, grid.maxq + 1, w.shape, generator=generator).float()
    return grid, codes


def _brute_indistinct(grid: QuantGrid, dtype: torch.dtype) -> int:
    levels = torch.arange(grid.maxq + 1, dtype=torch.float32)
    held = (grid.scale[..., None] * (levels - grid.zero[..., None])).to(dtype)
    return int((held[..., 1:] == held[..., :-1]).sum())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("positive", [False, True])
def test_codes_read_back_from_a_16_bit_weight(dtype, bits, symmetric, positive):
    grid, chosen = _grid_and_codes(bits, symmetric, positive)
    weight = grid.held(chosen, dtype)  # the float32 grid values rounded once to the dtype
    assert weight.dtype == dtype
    assert bool(grid.on_grid(weight).all())
    back = grid.codes(weight)
    assert torch.equal(grid.held(back, dtype), weight)  # the code reproduces the weight
    # a code differs only where the level the quantizer chose and a neighbour round alike
    up = grid.held((chosen + 1).clamp(max=grid.maxq), dtype)
    down = grid.held((chosen - 1).clamp(min=0), dtype)
    alike = ((up == weight) & (chosen < grid.maxq)) | ((down == weight) & (chosen > 0))
    assert torch.equal(back[~alike], chosen[~alike])
    count = indistinct_levels(grid, dtype)
    assert count == _brute_indistinct(grid, dtype)
    if count == 0:
        assert torch.equal(back, chosen)


def test_which_grids_a_dtype_cannot_hold_level_by_level():
    asym8, _ = _grid_and_codes(8, symmetric=False, positive=True)
    sym8, _ = _grid_and_codes(8, symmetric=True, positive=True)
    asym7, _ = _grid_and_codes(7, symmetric=False, positive=True)
    assert indistinct_levels(asym8, torch.bfloat16) > 0  # |k - zero| up to 255 > 128
    assert indistinct_levels(sym8, torch.bfloat16) == 0  # |k - zero| <= 128
    assert indistinct_levels(asym7, torch.bfloat16) == 0  # |k - zero| <= 127
    assert indistinct_levels(asym8, torch.float16) == 0  # 11 significant bits
    assert indistinct_levels(asym8, torch.float32) == 0
    # fp16: a step below the subnormal spacing 2**-24 cannot be held
    tiny = QuantGrid(torch.full((2, 1), 2.0**-27), torch.zeros(2, 1), 4, None, False)
    assert indistinct_levels(tiny, torch.float16) == _brute_indistinct(tiny, torch.float16) > 0


@pytest.mark.parametrize("dtype", LOW)
def test_a_16_bit_weight_between_grid_values_is_off_the_grid(dtype):
    grid, chosen = _grid_and_codes(4, symmetric=False)
    weight = grid.held(chosen, dtype)
    nudged = weight.clone()
    nudged[0, 0] = (weight[0, 0].float() + 0.3 * grid.scale[0, 0]).to(dtype)  # between levels
    on = grid.on_grid(nudged)
    assert not bool(on[0, 0]) and bool(on.flatten()[1:].all())


def test_on_grid_is_for_16_bit_weights():
    grid, chosen = _grid_and_codes(4, symmetric=False)
    with pytest.raises(Exception, match=r"w\.dtype=torch\.float32.*16-bit"):
        grid.on_grid(grid.dequantize(chosen))
