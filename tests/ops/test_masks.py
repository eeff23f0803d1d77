import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.masks import (
    global_masks,
    nm_mask,
    pack_mask,
    parse_pattern,
    row_mask,
    unpack_mask,
    unstructured_mask,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_unstructured_exact_and_smallest(sparsity):
    scores = torch.randn(8, 16).abs()
    mask = unstructured_mask(scores, sparsity)
    assert int((~mask).sum()) == round(sparsity * scores.numel())
    if sparsity > 0:
        assert scores[~mask].max() <= scores[mask].min()


def test_row_mask_exact_per_row():
    scores = torch.rand(5, 12)
    mask = row_mask(scores, 0.5)
    assert torch.all((~mask).sum(dim=1) == 6)
    for r in range(5):
        assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_pattern_holds_in_every_group(n, m):
    scores = torch.rand(6, 4 * m)
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(-1, m)
    assert torch.all(groups.sum(dim=1) == n)
    # the kept entries are the n largest of each group (brute force)
    for g_scores, g_mask in zip(scores.reshape(-1, m), groups, strict=True):
        assert set(torch.topk(g_scores, n).indices.tolist()) == set(torch.where(g_mask)[0].tolist())


def test_global_mask_total_count_and_threshold():
    a, b = torch.rand(4, 8), torch.rand(2, 8) * 3
    ma, mb = global_masks([a, b], 0.5)
    assert int((~ma).sum() + (~mb).sum()) == 24
    kept = torch.cat([a[ma], b[mb]])
    pruned = torch.cat([a[~ma], b[~mb]])
    assert pruned.max() <= kept.min()


def test_keep_is_never_revived_and_counts_towards_sparsity():
    scores = torch.rand(4, 8)
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[0] = False  # 8 entries (25%) already pruned, although they have high scores
    scores[0] = 10.0
    mask = unstructured_mask(scores, 0.5, keep)
    assert not mask[0].any() and int((~mask).sum()) == 16
    assert not unstructured_mask(scores, 0.1, keep)[0].any()  # target below existing: no regrowth
    assert not nm_mask(scores, 2, 4, keep)[0].any()
    assert not row_mask(scores, 0.25, keep)[0].any()
    assert not global_masks([scores], 0.5, [keep])[0][0].any()


@pytest.mark.parametrize("pattern", ["3:2", "a:b", "2:2", "0:4", "2-4", "", "unstructured "])
def test_bad_patterns(pattern):
    with pytest.raises(PPQConfigError, match="pattern"):
        parse_pattern(pattern)


def test_pattern_parsing():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)


def test_nm_needs_divisible_width():
    with pytest.raises(PPQConfigError, match="pattern"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_bad_sparsity(sparsity):
    with pytest.raises(PPQConfigError, match="sparsity"):
        unstructured_mask(torch.rand(2, 4), sparsity)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 9), (2, 3, 3, 3)])
def test_mask_packing_round_trip_and_size(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(bits, shape), mask)
