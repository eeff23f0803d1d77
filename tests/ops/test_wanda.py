"""Wanda's activation statistic: the running mean of x_j^2 per input feature."""

import pytest
import torch

from ppq_lightning.ops.wanda import accumulate_act_norms, wanda_mask
from tests.helpers import float_copy_sizes


def test_running_mean_of_squares_in_either_precision():
    x = torch.randn(10 * 32, 16, generator=torch.Generator().manual_seed(0))
    exact = x.double().pow(2).mean(dim=0)
    for dtype in (torch.float32, torch.float64):
        acc, n = None, 0
        for chunk in x.split(32):
            acc, n = accumulate_act_norms(acc, chunk, n, dtype)
        assert acc.dtype == dtype and n == len(x)
        torch.testing.assert_close(acc.double(), exact, rtol=1e-6, atol=0)


def test_mask_keeps_the_largest_weight_times_norm_in_each_row():
    w = torch.tensor([[1.0, -1.0, 3.0, 1.0], [4.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([4.0, 1.0, 0.25, 16.0])  # mean x_j^2: scores |w| * (2, 1, 0.5, 4)
    mask = wanda_mask(w, norms, sparsity=0.5)  # row 0 scores 2, 1, 1.5, 4: not |w|'s choice
    assert mask.tolist() == [[True, False, False, True], [True, False, False, True]]


def test_layer_scope_takes_one_threshold_over_the_whole_matrix():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    norms = torch.ones(4)
    row = wanda_mask(w, norms, sparsity=0.5)
    layer = wanda_mask(w, norms, sparsity=0.5, scope="layer")
    assert row.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert layer.tolist() == [[False, False, False, False], [True, True, True, True]]
    keep = torch.ones_like(layer)
    keep[1, 0] = False  # pruned before: stays pruned, and counts towards the sparsity
    again = wanda_mask(w, norms, sparsity=0.5, keep=keep, scope="layer")
    assert again.tolist() == [[False, False, False, True], [False, True, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (None, (2, 4))])
def test_a_mask_decided_by_row_slices_equals_the_whole_matrixs(dtype, sparsity, nm):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(37, 32, generator=generator).to(dtype)
    norms = torch.rand(32, generator=generator)
    keep = torch.rand(37, 32, generator=generator) > 0.2
    whole = wanda_mask(w, norms, sparsity, nm, keep, rows=37)
    sliced = wanda_mask(w, norms, sparsity, nm, keep, rows=5)  # 8 slices, one short
    assert torch.equal(sliced, whole) and not (sliced & ~keep).any()


def test_a_mask_holds_float32_scores_of_one_slice_only(monkeypatch):
    w = torch.randn(4096, 64).to(torch.bfloat16)
    sizes = float_copy_sizes(monkeypatch)
    wanda_mask(w, torch.ones(64), 0.5, rows=64)
    assert sizes and max(sizes) == 64 * 64
