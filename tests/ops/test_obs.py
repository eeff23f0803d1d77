"""GPTQ and SparseGPT against brute force and their simpler counterparts on tiny matrices."""

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.gptq import gptq
from ppq_lightning.ops.hessian import accumulate_hessian, prepare_hessian
from ppq_lightning.ops.masks import nm_mask, unstructured_mask
from ppq_lightning.ops.quant_grid import compute_grid
from ppq_lightning.ops.sparsegpt import sparsegpt


def _problem(rows=8, cols=32, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated
    w = torch.randn(rows, cols, generator=g)
    h, _ = accumulate_hessian(None, x, 0)
    return w, h, x


def _error(w, w_hat, x):
    return float(((w - w_hat) @ x.T).pow(2).sum())


def _obs_reference(w, h, bits):
    """Column by column OBS quantization with the full inverse Hessian updated each step."""
    w = w.clone().double()
    grid = compute_grid(w.float(), bits)
    hd = h.double() + 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    for i in range(w.shape[1]):
        scale, zero = grid.scale[:, 0].double(), grid.zero[:, 0].double()
        q = scale * (torch.clamp(torch.round(w[:, i] / scale) + zero, 0, grid.maxq) - zero)
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        w[:, i] = q
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return w.float()


def test_gptq_equals_column_by_column_obs():
    w, h, _ = _problem()
    reference = _obs_reference(w, h, 4)
    for block_size in (1, 5, 128):
        torch.testing.assert_close(
            gptq(w, h, 4, block_size=block_size).weight, reference, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize(("bits", "group_size"), [(3, None), (4, None), (4, 8)])
def test_gptq_beats_rtn_and_lands_on_its_grid(bits, group_size):
    w, h, x = _problem()
    result = gptq(w, h, bits, group_size)
    rtn = compute_grid(w, bits, group_size).fake_quantize(w)
    assert _error(w, result.weight, x) < _error(w, rtn, x)
    assert result.grid.off_grid_distance(result.weight).max() < 1e-4
    ordered = gptq(w, h, bits, group_size, act_order=True)
    assert ordered.grid.off_grid_distance(ordered.weight).max() < 1e-4


def test_gptq_with_a_fixed_mask_keeps_zeros_exactly():
    w, h, _ = _problem()
    mask = unstructured_mask(w.abs(), 0.5)
    result = gptq(w * mask, h, 4, mask=mask)
    assert torch.all(result.weight[~mask] == 0)
    assert result.grid.off_grid_distance(result.weight).max() < 1e-4


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude(pattern):
    w, h, x = _problem()
    if pattern is None:
        # blocks narrower than the layer: the mask is chosen on updated weights
        result = sparsegpt(w, h, sparsity=0.5, block_size=8)
        magnitude = unstructured_mask(w.abs(), 0.5)
        assert (~result.mask).sum() == 128
    else:
        result, magnitude = sparsegpt(w, h, nm=pattern), nm_mask(w.abs(), *pattern)
        assert torch.all(result.mask.reshape(-1, 4).sum(1) == 2)
    assert torch.all(result.weight[~result.mask] == 0)
    assert _error(w, result.weight, x) < _error(w, w * magnitude, x)


def test_sparsegpt_keeps_earlier_mask_and_existing_grid():
    w, h, _ = _problem()
    grid = compute_grid(w, 4)
    wq = grid.fake_quantize(w)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.2
    result = sparsegpt(wq * keep, h, sparsity=0.5, keep=keep, grid=grid)
    assert not torch.any(result.mask & ~keep)
    assert torch.all(result.weight[~result.mask] == 0)
    assert grid.off_grid_distance(result.weight).max() < 1e-4
    joint = sparsegpt(w, h, sparsity=0.5, bits=4)
    assert joint.grid.off_grid_distance(joint.weight).max() < 1e-4


def test_singular_hessian_raises_damping_and_zeroes_dead_inputs():
    w, _, x = _problem(n=8)  # fewer samples than features: rank 8 of 32
    x[:, 1] = x[:, 0]  # duplicated feature
    x[:, 2] = 0  # dead feature
    h, _ = accumulate_hessian(None, x, 0)
    prepared = prepare_hessian(h, damp=1e-12)
    assert prepared.dead[2] and (prepared.retries > 0 or prepared.damp > 1e-12)
    result = gptq(w, h, 4, damp=1e-12)
    assert torch.all(result.weight[:, 2] == 0) and torch.isfinite(result.weight).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w, h: gptq(w, h, 9), "bits=9"),
        (lambda w, h: gptq(w, h, 4, group_size=5), "group_size=5"),
        (lambda w, h: gptq(w, h[:4, :4], 4), "H="),
        (lambda w, h: gptq(w, h, 4, block_size=0), "block_size=0"),
        (lambda w, h: gptq(w, h, 4, damp=0), "damp=0"),
        (lambda w, h: sparsegpt(w, h), "exactly one"),
        (lambda w, h: sparsegpt(w, h, nm=(2, 5)), "pattern"),
        (lambda w, h: sparsegpt(w, h, sparsity=0.5, bits=4, grid=compute_grid(w, 4)), "exclusive"),
    ],
)
def test_bad_inputs(call, match):
    w, h, _ = _problem()
    with pytest.raises(PPQConfigError, match=match):
        call(w, h)


@pytest.mark.parametrize(
    ("block", "group", "expected"),
    [(128, None, 128), (128, 32, 128), (128, 256, 128), (128, 96, 96), (64, 96, 96), (3, 4, 4)],
)
def test_aligned_block_size_never_lets_a_group_straddle_two_blocks(block, group, expected):
    from ppq_lightning.ops.obs import aligned_block_size

    assert aligned_block_size(block, group) == expected
