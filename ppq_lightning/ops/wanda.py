"""Wanda scores: weight magnitude times input activation norm (Sun et al., 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ppq_lightning.ops.grid import ROUND_ROWS
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
    rows: int = ROUND_ROWS,
) -> Tensor:
    """Wanda's mask: the lowest scores of every output row (``scope="row"``), of the whole
    matrix (``scope="layer"``) or of every N:M group are pruned.

    Per-row and N:M decisions are made ``rows`` rows at a time, so the float32 scores and the
    sort's indices cover one slice, not the matrix (a 70B MLP weight has 235M entries); the
    mask equals the whole matrix's, since every row's decision reads that row alone.

    Args:
        w: weight matrix ``(rows, cols)``, any float dtype.
        act_sq_norm: the mean of ``x_j^2`` per input feature ``(cols,)``.
        sparsity: the share pruned per comparison group (None with ``nm``).
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs.
        keep: entries already pruned (False) stay pruned.
        scope: ``"row"`` or ``"layer"`` (one comparison group for the whole matrix).
        rows: rows per slice.

    Raises:
        PPQConfigError: a sparsity outside [0, 1), or an ``m`` that does not divide ``cols``.
    """
    if nm is None and scope != "row":
        return unstructured_mask(wanda_scores(w, act_sq_norm), sparsity, keep=keep)
    parts = []
    for start in range(0, w.shape[0], rows):
        scores = wanda_scores(w[start : start + rows], act_sq_norm)
        kept = None if keep is None else keep[start : start + rows]
        if nm is not None:
            parts.append(nm_mask(scores, *nm, keep=kept))
        else:
            parts.append(row_mask(scores, sparsity, keep=kept))
    return torch.cat(parts) if parts else torch.ones(w.shape, dtype=torch.bool, device=w.device)
