"""Wanda scores: weight magnitude times input activation norm (Sun et al., 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ppq_lightning.ops.masks import nm_mask, row_mask, unstructured_mask

WANDA_SCOPES = ("row", "layer")
"""Wanda's comparison groups: each output row (the paper's choice for LLMs) or the whole layer
(the reference code's ``--prune_granularity layer`` for image classifiers)."""


def accumulate_act_norms(
    acc: Tensor | None,
    x: Tensor,
    n_seen: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Running mean of ``x_j^2`` per input feature over the rows of ``x`` (``(n, cols)``),
    accumulated in ``dtype`` (a convolution's comes from ``ops.conv_statistics``)."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    n_new = n_seen + x.shape[0]
    total = x.pow(2).sum(dim=0)  # (cols,)
    if acc is None:
        return total / n_new, n_new
    return acc * (n_seen / n_new) + total / n_new, n_new


def wanda_scores(w: Tensor, act_sq_norm: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||`` for a weight matrix ``(rows, cols)``."""
    return w.abs().float() * act_sq_norm.sqrt()[None, :]


def wanda_mask(
    w: Tensor,
    act_sq_norm: Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    keep: Tensor | None = None,
    scope: str = "row",
) -> Tensor:
    """Wanda's mask: the lowest scores of every output row (``scope="row"``), of the whole
    matrix (``scope="layer"``) or of every N:M group are pruned."""
    scores = wanda_scores(w, act_sq_norm)
    if nm is not None:
        return nm_mask(scores, *nm, keep=keep)
    make = row_mask if scope == "row" else unstructured_mask
    return make(scores, sparsity, keep=keep)
