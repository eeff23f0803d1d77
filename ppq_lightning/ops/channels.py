"""Importance of structured groups (MLP channels, attention heads) for structured pruning."""

from __future__ import annotations

import torch
from torch import Tensor

from ppq_lightning.ops.masks import check_sparsity


def channel_importance(act_sq_mean: Tensor, w_out: Tensor) -> Tensor:
    """Expected squared contribution of each input channel of an output projection.

    ``E[x_j^2] * ||W_out[:, j]||^2`` (the reconstruction loss of removing channel ``j`` when the
    channels are uncorrelated).

    Args:
        act_sq_mean: mean squared activation per input channel, ``(in,)``.
        w_out: the output projection's weight matrix, ``(out, in)``.

    Returns:
        ``(in,)`` importances.
    """
    return act_sq_mean.float() * w_out.float().pow(2).sum(dim=0)


def keep_most_important(scores: Tensor, ratio: float, group: int = 1) -> Tensor:
    """Sorted indices of the entries kept when removing a ``ratio`` of groups of ``group``
    consecutive entries (``group`` = head_dim for attention heads), lowest summed score first.

    At least one group is always kept.

    Raises:
        PPQConfigError: when ``ratio`` is not in [0, 1).
    """
    check_sparsity(ratio, "ratio")
    groups = scores.reshape(-1, group).sum(dim=1)  # (n_groups,)
    n_keep = max(1, groups.numel() - round(ratio * groups.numel()))
    kept = torch.topk(groups, n_keep).indices.sort().values  # (n_keep,)
    return (kept[:, None] * group + torch.arange(group)).flatten()


def kv_group_rows(kept: Tensor, group: int, head_dim: int) -> Tensor:
    """The key/value rows that serve the kept query rows under grouped-query attention.

    Query rows come in groups of ``group = (query heads per KV head) * head_dim`` consecutive
    rows, one group per key/value head, and ``kept`` (from :func:`keep_most_important` with
    that ``group``) keeps whole groups. Key/value head ``g`` is rows
    ``g * head_dim ... (g + 1) * head_dim - 1`` of ``k_proj``/``v_proj``.

    Args:
        kept: sorted indices of the kept query rows (whole groups), ``(n_kept_groups * group,)``.
        group: query rows per key/value head.
        head_dim: rows per head.

    Returns:
        Sorted indices of the key/value rows to keep, ``(n_kept_groups * head_dim,)``.
    """
    groups = kept.reshape(-1, group)[:, 0] // group  # (n_kept_groups,) KV head indices
    return (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
