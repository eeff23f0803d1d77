"""Structured importances (ppq_lightning.ops.channels): channel scores, whole groups kept, and
the key/value rows of grouped-query attention, against brute force."""

import itertools
import re

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.channels import channel_importance, keep_most_important, kv_group_rows


def test_channel_importance_is_mean_square_activation_times_column_norm():
    g = torch.Generator().manual_seed(0)
    act, w_out = torch.rand(5, generator=g), torch.randn(3, 5, generator=g)
    scores = channel_importance(act, w_out)
    expected = torch.tensor(
        [float(act[j]) * sum(float(w_out[i, j]) ** 2 for i in range(3)) for j in range(5)]
    )
    torch.testing.assert_close(scores, expected)


def test_channel_importance_is_the_output_error_of_removing_the_channel():
    g = torch.Generator().manual_seed(1)
    x, w_out = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g)
    scores = channel_importance(x.pow(2).mean(dim=0), w_out)
    for j in range(6):
        removed = w_out.double().clone()
        removed[:, j] = 0
        error = (x @ w_out.double().T - x @ removed.T).pow(2).sum(dim=1).mean()
        assert float(scores[j]) == pytest.approx(float(error), rel=1e-5)


def test_channel_importance_returns_float32():
    scores = channel_importance(torch.ones(4, dtype=torch.float16), torch.ones(2, 4).double())
    assert scores.dtype == torch.float32
    assert torch.equal(scores, torch.full((4,), 2.0))


def test_keep_most_important_keeps_the_highest_scores_in_sorted_order():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 1.0, 4.0])
    assert torch.equal(keep_most_important(scores, 0.5), torch.tensor([1, 3, 5]))
    assert torch.equal(keep_most_important(scores, 0.0), torch.arange(6))


def test_keep_most_important_always_keeps_one_group():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0])
    assert torch.equal(keep_most_important(scores, 0.99), torch.tensor([1]))
    assert torch.equal(keep_most_important(scores, 0.99, group=2), torch.tensor([0, 1]))


@pytest.mark.parametrize(("ratio", "group"), [(0.25, 3), (0.5, 2), (0.75, 1), (0.4, 4)])
def test_keep_most_important_keeps_the_best_whole_groups_by_brute_force(ratio, group):
    n_groups = 10 if group == 4 else 12
    scores = torch.rand(n_groups * group, generator=torch.Generator().manual_seed(2))
    sums = scores.reshape(n_groups, group).sum(dim=1)
    n_keep = n_groups - round(ratio * n_groups)
    best = max(
        itertools.combinations(range(n_groups), n_keep), key=lambda c: float(sums[list(c)].sum())
    )
    expected = torch.tensor([g * group + k for g in best for k in range(group)])
    assert torch.equal(keep_most_important(scores, ratio, group), expected)


@pytest.mark.parametrize("ratio", [1.0, -0.1, True])
def test_keep_most_important_rejects_a_bad_ratio(ratio):
    message = f"ratio={ratio!r} is not allowed: expected a number in [0, 1)."
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        keep_most_important(torch.ones(4), ratio)


def test_kv_group_rows_of_two_query_heads_per_kv_head():
    # 4 query heads of head_dim 3 over 2 KV heads: KV head g serves query rows 6g .. 6g + 5
    head_dim, group = 3, 2 * 3
    assert torch.equal(kv_group_rows(torch.arange(6, 12), group, head_dim), torch.arange(3, 6))
    assert torch.equal(kv_group_rows(torch.arange(0, 6), group, head_dim), torch.arange(0, 3))
    assert torch.equal(kv_group_rows(torch.arange(12), group, head_dim), torch.arange(6))


def test_kv_group_rows_follow_the_kept_query_heads_by_brute_force():
    # 8 query heads of head_dim 2 over 4 KV heads (2 query heads per KV head)
    head_dim, q_per_kv, n_kv = 2, 2, 4
    group = q_per_kv * head_dim
    scores = torch.rand(n_kv * group, generator=torch.Generator().manual_seed(3))
    kept = keep_most_important(scores, 0.5, group)
    kv_heads = sorted({int(row) // head_dim // q_per_kv for row in kept})
    expected = torch.tensor([h * head_dim + d for h in kv_heads for d in range(head_dim)])
    assert len(kv_heads) == 2
    assert torch.equal(kv_group_rows(kept, group, head_dim), expected)
