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
