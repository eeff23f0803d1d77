"""SparseGPT (ppq_lightning.ops.sparsegpt) on tiny matrices: exact per-block sparsity, N:M
patterns, earlier masks, magnitude pruning as its diagonal-Hessian case, joint quantization and
argument errors."""

import re

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.masks import nm_mask, unstructured_mask
from ppq_lightning.ops.quant_grid import compute_grid
from ppq_lightning.ops.sparsegpt import sparsegpt

ROWS, COLS = 5, 24


def _weight(rows=ROWS, cols=COLS, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _correlated_hessian(cols=COLS, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return 2 * x.T @ x / n


def _keep(shape=(ROWS, COLS), alive=0.8, seed=4):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < alive


def _blocks(cols, block_size):
    return [(i, min(i + block_size, cols)) for i in range(0, cols, block_size)]


def _assert_on_grid(weight, grid):
    cols = weight.shape[1]
    scale = grid.scale.repeat_interleave(cols // grid.scale.shape[1], dim=1)
    zero = grid.zero.repeat_interleave(cols // grid.zero.shape[1], dim=1)
    codes = weight / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= grid.maxq


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
@pytest.mark.parametrize("block_size", [8, 10, 128])
def test_sparsegpt_prunes_exactly_the_sparsity_of_every_block(sparsity, block_size):
    # 24 columns in blocks of 10 leave a last block of 4: each block is rounded on its own
    result = sparsegpt(_weight(), _correlated_hessian(), sparsity=sparsity, block_size=block_size)
    for i1, i2 in _blocks(COLS, block_size):
        pruned = int((~result.mask[:, i1:i2]).sum())
        assert pruned == round(sparsity * ROWS * (i2 - i1))
    assert torch.all(result.weight[~result.mask] == 0)
    assert result.mask.dtype == torch.bool and result.mask.shape == (ROWS, COLS)
    assert result.grid is None


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("block_size", [2, 6, 128])
def test_sparsegpt_nm_pattern_holds_in_every_group_of_m(n, m, block_size):
    # block sizes that are no multiple of M (or smaller than M) are rounded to one
    result = sparsegpt(_weight(), _correlated_hessian(), nm=(n, m), block_size=block_size)
    assert torch.all(result.mask.reshape(ROWS, -1, m).sum(dim=2) == n)
    assert torch.all(result.weight[~result.mask] == 0)


def test_sparsegpt_keep_mask_stays_pruned_and_counts_towards_the_sparsity():
    keep = _keep()  # about 20 % pruned already, fewer than the 50 % target of any block
    result = sparsegpt(
        _weight() * keep, _correlated_hessian(), sparsity=0.5, keep=keep, block_size=8
    )
    assert not torch.any(result.mask & ~keep)
    for i1, i2 in _blocks(COLS, 8):
        assert int((~result.mask[:, i1:i2]).sum()) == round(0.5 * ROWS * (i2 - i1))
    assert torch.all(result.weight[~result.mask] == 0)


def test_sparsegpt_keep_mask_sparser_than_the_target_is_kept_as_is():
    keep = _keep(alive=0.3)  # about 70 % pruned already: no block needs more pruning
    assert all(int((~keep[:, a:b]).sum()) >= round(0.5 * ROWS * (b - a)) for a, b in _blocks(24, 8))
    result = sparsegpt(_weight(), _correlated_hessian(), sparsity=0.5, keep=keep, block_size=8)
    assert torch.equal(result.mask, keep)
    assert torch.all(result.weight[~keep] == 0)


def test_sparsegpt_nm_with_a_keep_mask_never_revives_and_keeps_at_most_n():
    keep = _keep(alive=0.7)
    result = sparsegpt(_weight(), _correlated_hessian(), nm=(2, 4), keep=keep)
    assert not torch.any(result.mask & ~keep)
    kept_per_group = result.mask.reshape(ROWS, -1, 4).sum(dim=2)
    alive_per_group = keep.reshape(ROWS, -1, 4).sum(dim=2)
    assert torch.equal(kept_per_group, alive_per_group.clamp(max=2))


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
@pytest.mark.parametrize("block_size", [8, 10, 128])
def test_sparsegpt_with_a_scaled_identity_hessian_is_magnitude_pruning_per_block(
    sparsity, block_size
):
    # H = c I: [H^-1]_ii is one constant, so the saliency ranks like w^2, and nothing propagates
    w = _weight()
    result = sparsegpt(w, 2.0 * torch.eye(COLS), sparsity=sparsity, block_size=block_size)
    for i1, i2 in _blocks(COLS, block_size):
        expected = unstructured_mask(w[:, i1:i2].abs(), sparsity)
        assert torch.equal(result.mask[:, i1:i2], expected)
    assert torch.equal(result.weight, w * result.mask)  # survivors unchanged


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4)])
def test_sparsegpt_nm_with_a_scaled_identity_hessian_is_nm_magnitude_pruning(n, m):
    w = _weight()
    result = sparsegpt(w, 2.0 * torch.eye(COLS), nm=(n, m), block_size=8)
    assert torch.equal(result.mask, nm_mask(w.abs(), n, m))
    assert torch.equal(result.weight, w * result.mask)


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_sparsegpt_joint_mode_puts_survivors_on_the_returned_grid(group_size, symmetric):
    result = sparsegpt(
        _weight(),
        _correlated_hessian(),
        sparsity=0.5,
        bits=3,
        group_size=group_size,
        symmetric=symmetric,
        block_size=8,
    )
    assert result.grid is not None
    assert (result.grid.bits, result.grid.group_size, result.grid.symmetric) == (
        3,
        group_size,
        symmetric,
    )
    _assert_on_grid(result.weight, result.grid)
    assert torch.all(result.weight[~result.mask] == 0)
    assert int((~result.mask).sum()) == ROWS * COLS // 2


@pytest.mark.parametrize("group_size", [None, 4])
def test_sparsegpt_joint_mode_with_a_scaled_identity_hessian_is_masked_rtn(group_size):
    w = _weight()
    result = sparsegpt(w, torch.eye(COLS), sparsity=0.5, bits=4, group_size=group_size)
    rtn_grid = compute_grid(w, 4, group_size)
    assert torch.equal(result.mask, unstructured_mask(w.abs(), 0.5))
    assert torch.equal(result.grid.scale, rtn_grid.scale)
    assert torch.equal(result.weight, rtn_grid.fake_quantize(w) * result.mask)


def test_sparsegpt_with_an_existing_grid_reprojects_survivors_onto_it():
    w = _weight()
    grid = compute_grid(1.5 * w, 3, group_size=8)
    scale, zero = grid.scale.clone(), grid.zero.clone()
    result = sparsegpt(w, _correlated_hessian(), sparsity=0.5, grid=grid, block_size=8)
    assert torch.equal(result.grid.scale, scale) and torch.equal(result.grid.zero, zero)
    assert torch.equal(grid.scale, scale)  # the given grid is not modified
    _assert_on_grid(result.weight, grid)
    assert torch.all(result.weight[~result.mask] == 0)
    # with no error feedback the survivors are exactly the rounded weights
    diagonal = sparsegpt(w, torch.eye(COLS), sparsity=0.5, grid=grid)
    assert torch.equal(diagonal.weight, grid.fake_quantize(w) * diagonal.mask)


def test_sparsegpt_does_not_modify_its_inputs():
    w, h, keep = _weight(), _correlated_hessian(), _keep()
    before = (w.clone(), h.clone(), keep.clone())
    sparsegpt(w, h, sparsity=0.5, keep=keep, bits=4)
    assert all(torch.equal(a, b) for a, b in zip((w, h, keep), before, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.5, "nm": (2, 4)}, "sparsity=0.5, pattern=(2, 4): give exactly one."),
        ({"sparsity": 1.0}, "sparsity=1.0 is not allowed: expected a number in [0, 1)."),
        ({"sparsity": -0.1}, "sparsity=-0.1 is not allowed"),
        ({"nm": (4, 4)}, "pattern='4:4' is not allowed: expected 0 < N < M with M dividing 24"),
        ({"nm": (0, 4)}, "pattern='0:4' is not allowed"),
        ({"nm": (2, 5)}, "pattern='2:5' is not allowed"),
        ({"sparsity": 0.5, "bits": 1}, "bits=1 is not allowed: expected an integer from 2 to 8."),
        ({"sparsity": 0.5, "bits": 4, "group_size": 5}, "group_size=5 is not allowed"),
        ({"sparsity": 0.5, "block_size": 0}, "block_size=0 is not allowed"),
        ({"sparsity": 0.5, "damp": 0.0}, "damp=0.0 is not allowed"),
    ],
)
def test_sparsegpt_rejects_bad_arguments(kwargs, message):
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        sparsegpt(_weight(), _correlated_hessian(), **kwargs)


def test_sparsegpt_rejects_a_keep_mask_of_the_wrong_shape():
    keep = torch.ones(COLS, ROWS, dtype=torch.bool)
    with pytest.raises(PPQConfigError, match=re.escape("keep=(24, 5) is not allowed")):
        sparsegpt(_weight(), _correlated_hessian(), sparsity=0.5, keep=keep)


def test_sparsegpt_rejects_a_hessian_of_the_wrong_shape():
    with pytest.raises(PPQConfigError, match=re.escape("H=(5, 5) is not allowed")):
        sparsegpt(_weight(), torch.eye(ROWS), sparsity=0.5)


@pytest.mark.parametrize("k", [1, 7, 30, 59, 60])
@pytest.mark.parametrize("levels", [None, 3, 12])  # None: distinct scores; else many ties
def test_sparsegpt_selection_of_the_lowest_saliencies_is_topks(k, levels):
    # the block's mask is found by kthvalue (linear time) and must be topk's, ties included
    from ppq_lightning.ops.sparsegpt import _lowest

    g = torch.Generator().manual_seed(k)
    scores = torch.rand(6, 10, generator=g)
    if levels is not None:
        scores = (scores * levels).floor()
    scores[0, :3] = -torch.inf  # an earlier mask's entries
    expected = torch.zeros(60, dtype=torch.bool)
    expected[torch.topk(scores.flatten(), k, largest=False).indices] = True
    assert torch.equal(_lowest(scores, k), expected.view(6, 10))
