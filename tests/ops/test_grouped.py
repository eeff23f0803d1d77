from typing import NamedTuple

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.gptq import GPTQResult, gptq
from ppq_lightning.ops.grouped import (
    grid_rows,
    merge_results,
    row_groups,
    solve_by_groups,
    take_rows,
)
from ppq_lightning.ops.hessian import accumulate_hessian
from ppq_lightning.ops.quant_grid import QuantGrid, compute_grid
from ppq_lightning.ops.sparsegpt import SparseGPTResult, sparsegpt
from ppq_lightning.ops.wanda import wanda_mask


def _grid(rows: int, offset: float = 0.0, groups: int = 1) -> QuantGrid:
    scale = torch.arange(1.0, rows * groups + 1).reshape(rows, groups) + offset
    return QuantGrid(scale, torch.full((rows, groups), 7.0), 4, None, False)


def _hessian(cols: int, seed: int) -> torch.Tensor:
    x = torch.randn(64, cols, generator=torch.Generator().manual_seed(seed))
    return accumulate_hessian(None, x, 0)[0]


def test_row_groups_are_equal_runs_of_consecutive_rows():
    assert row_groups(6, 3) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert row_groups(4, 1) == [slice(0, 4)]
    assert row_groups(5, 5) == [slice(j, j + 1) for j in range(5)]


@pytest.mark.parametrize(("rows", "groups"), [(6, 4), (6, 0), (3, -1), (2, 3)])
def test_row_groups_refuse_groups_that_do_not_divide_the_rows(rows, groups):
    with pytest.raises(PPQConfigError, match=rf"groups={groups} does not divide the {rows} weight"):
        row_groups(rows, groups)


def test_concat_grids_joins_rows_in_order():
    a, b = _grid(2, groups=3), _grid(3, offset=10.0, groups=3)
    joined = QuantGrid.concat([a, b])
    assert torch.equal(joined.scale, torch.cat([a.scale, b.scale]))
    assert torch.equal(joined.zero, torch.cat([a.zero, b.zero]))
    assert (joined.bits, joined.group_size, joined.symmetric) == (4, None, False)
    assert joined.scale.shape == (5, 3)


def test_grid_rows_and_take_rows():
    grid = _grid(6)
    part = grid_rows(grid, slice(2, 4))
    assert torch.equal(part.scale, grid.scale[2:4]) and torch.equal(part.zero, grid.zero[2:4])
    assert (part.bits, part.group_size, part.symmetric) == (grid.bits, None, False)
    assert grid_rows(None, slice(0, 1)) is None
    tensor = torch.arange(12).reshape(6, 2)
    assert torch.equal(take_rows(tensor, slice(4, 6)), tensor[4:])
    assert take_rows(None, slice(0, 2)) is None


def test_merge_results_of_tensors_concatenates_rows():
    parts = [torch.ones(2, 3), torch.zeros(1, 3), torch.full((2, 3), 2.0)]
    assert torch.equal(merge_results(parts), torch.cat(parts))


def test_merge_results_of_gptq_results():
    a = GPTQResult(torch.ones(2, 4), _grid(2), loss=1.5, damp=0.01, retries=0)
    b = GPTQResult(torch.zeros(3, 4), _grid(3, offset=5.0), loss=2.25, damp=0.04, retries=2)
    merged = merge_results([a, b])
    assert isinstance(merged, GPTQResult)
    assert torch.equal(merged.weight, torch.cat([a.weight, b.weight]))
    assert torch.equal(merged.grid.scale, torch.cat([a.grid.scale, b.grid.scale]))
    assert merged.loss == 3.75 and isinstance(merged.loss, float)
    assert merged.retries == 2 and isinstance(merged.retries, int)
    assert merged.damp == 0.04


def test_merge_results_of_sparsegpt_results_keeps_a_missing_grid_missing():
    a = SparseGPTResult(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), None, 0.5, 0.02, 1)
    b = SparseGPTResult(torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.bool), None, 0.25, 0.01, 3)
    merged = merge_results([a, b])
    assert isinstance(merged, SparseGPTResult)
    assert merged.grid is None
    assert torch.equal(merged.mask, torch.cat([a.mask, b.mask])) and merged.mask.dtype == torch.bool
    assert (merged.loss, merged.damp, merged.retries) == (0.75, 0.02, 4)


def test_merge_results_refuses_unknown_fields():
    class Odd(NamedTuple):
        weight: torch.Tensor
        note: str

    with pytest.raises(TypeError, match=r"cannot merge the field 'note' of Odd"):
        merge_results([Odd(torch.ones(1), "a"), Odd(torch.ones(1), "b")])


def test_solve_by_groups_on_a_plain_layer_calls_the_solver_once():
    calls = []

    def solve(w, h, rows):
        calls.append((w, h, rows))
        return w * 2

    w, h = torch.randn(4, 3), torch.eye(3)
    assert torch.equal(solve_by_groups(solve, w, h, grouped=False), w * 2)
    assert len(calls) == 1 and calls[0][0] is w and calls[0][1] is h
    assert calls[0][2] == slice(None)


def test_solve_by_groups_calls_the_solver_per_group():
    calls = []

    def solve(w, h, rows):
        calls.append((w.clone(), h.clone(), rows))
        return w + h.sum()

    w = torch.arange(24.0).reshape(6, 4)
    stacked = torch.stack([torch.full((4, 4), float(j)) for j in range(3)])
    merged = solve_by_groups(solve, w, stacked, grouped=True)
    assert [rows for _, _, rows in calls] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    for j, (wj, hj, rows) in enumerate(calls):
        assert torch.equal(wj, w[rows]) and torch.equal(hj, stacked[j])
    assert torch.equal(merged, torch.cat([w[0:2], w[2:4] + 16, w[4:6] + 32]))


def test_solve_by_groups_refuses_a_statistic_that_does_not_divide_the_rows():
    with pytest.raises(PPQConfigError, match=r"groups=4 does not divide the 6 weight rows"):
        solve_by_groups(lambda w, h, rows: w, torch.ones(6, 2), torch.ones(4, 2, 2), True)


def test_solve_by_groups_with_gptq_equals_gptq_per_group_by_hand():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    hessians = torch.stack([_hessian(5, seed) for seed in (1, 2)])
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(3)) > 0.3

    def solve(wg, hg, rows):
        return gptq(wg, hg, 3, mask=take_rows(mask, rows))

    merged = solve_by_groups(solve, w, hessians, grouped=True)
    parts = [gptq(w[:3], hessians[0], 3, mask=mask[:3]), gptq(w[3:], hessians[1], 3, mask=mask[3:])]
    assert torch.equal(merged.weight, torch.cat([p.weight for p in parts]))
    assert torch.equal(merged.grid.scale, torch.cat([p.grid.scale for p in parts]))
    assert torch.equal(merged.grid.zero, torch.cat([p.grid.zero for p in parts]))
    assert merged.loss == pytest.approx(parts[0].loss + parts[1].loss)
    assert merged.damp == max(p.damp for p in parts)
    assert (merged.weight[~mask] == 0).all()
    # one Hessian for all rows gives another result: the groups matter
    assert not torch.equal(gptq(w, hessians[0], 3, mask=mask).weight, merged.weight)


def test_solve_by_groups_with_sparsegpt_on_an_existing_grid():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    hessians = torch.stack([_hessian(8, seed) for seed in (4, 5)])
    grid = compute_grid(w, 4)

    def solve(wg, hg, rows):
        return sparsegpt(wg, hg, sparsity=0.5, grid=grid_rows(grid, rows))

    merged = solve_by_groups(solve, w, hessians, grouped=True)
    parts = [
        sparsegpt(w[:2], hessians[0], sparsity=0.5, grid=grid_rows(grid, slice(0, 2))),
        sparsegpt(w[2:], hessians[1], sparsity=0.5, grid=grid_rows(grid, slice(2, 4))),
    ]
    assert torch.equal(merged.weight, torch.cat([p.weight for p in parts]))
    assert torch.equal(merged.mask, torch.cat([p.mask for p in parts]))
    assert merged.retries == sum(p.retries for p in parts)
    assert torch.equal(grid.fake_quantize(merged.weight), merged.weight)


def test_solve_by_groups_with_wanda_masks():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    norms = torch.rand(2, 6, generator=torch.Generator().manual_seed(1))
    merged = solve_by_groups(lambda wg, ng, rows: wanda_mask(wg, ng, 0.5), w, norms, True)
    expected = torch.cat([wanda_mask(w[:2], norms[0], 0.5), wanda_mask(w[2:], norms[1], 0.5)])
    assert torch.equal(merged, expected)
    assert merged.sum() == 12


def test_single_threaded_runs_on_one_thread_and_restores_the_count():
    from ppq_lightning.ops.grouped import single_threaded

    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), single_threaded():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
