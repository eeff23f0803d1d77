"""project (ppq_lightning.ops.projection): a weight put back on its recorded mask and grid."""

import pytest
import torch

from ppq_lightning.ops.projection import project
from ppq_lightning.ops.quant_grid import compute_grid


def _weight(seed=0):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))


def _mask(seed=1):
    return torch.rand(4, 8, generator=torch.Generator().manual_seed(seed)) > 0.5


def test_project_without_mask_or_grid_returns_the_weight_itself():
    w = _weight()
    assert project(w) is w


def test_project_with_a_mask_zeroes_pruned_entries_and_keeps_the_rest_exactly():
    w, mask = _weight(), _mask()
    projected = project(w, mask)
    assert torch.all(projected[~mask] == 0)
    assert torch.equal(projected[mask], w[mask])


def test_project_with_a_grid_rounds_onto_it():
    w = _weight()
    grid = compute_grid(w, 3, group_size=4)
    assert torch.equal(project(w, grid=grid), grid.fake_quantize(w))


@pytest.mark.parametrize("symmetric", [False, True])
def test_project_onto_mask_and_grid_keeps_pruned_entries_exactly_zero(symmetric):
    w, mask = _weight(), _mask()
    grid = compute_grid(w, 3, symmetric=symmetric)  # asymmetric grids hold 0 exactly too
    projected = project(w, mask, grid)
    assert torch.all(projected[~mask] == 0)
    assert torch.equal(projected[mask], grid.fake_quantize(w)[mask])


@pytest.mark.parametrize("group_size", [None, 4])
def test_project_picks_the_nearest_grid_point_by_brute_force(group_size):
    w = 1.3 * _weight(seed=2)  # partly outside the grid of the unscaled weight: clamped
    grid = compute_grid(_weight(), 3, group_size)
    mask = _mask()
    projected = project(w, mask, grid)
    gs = group_size or w.shape[1]
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            scale, zero = grid.scale[r, c // gs], grid.zero[r, c // gs]
            levels = scale * (torch.arange(grid.maxq + 1, dtype=torch.float32) - zero)
            target = w[r, c] if mask[r, c] else torch.tensor(0.0)
            nearest = float((levels - target).abs().min())
            assert float((projected[r, c] - target).abs()) == pytest.approx(nearest, abs=1e-6)
            assert torch.isclose(levels, projected[r, c], atol=1e-6).any()


def test_project_is_idempotent_and_leaves_its_input_alone():
    w, mask = _weight(), _mask()
    before = w.clone()
    grid = compute_grid(w, 4)
    once = project(w, mask, grid)
    assert torch.equal(w, before)
    assert once is not w
    assert torch.equal(project(once, mask, grid), once)
