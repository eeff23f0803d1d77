"""Layer reconstruction error from second-moment statistics."""

from __future__ import annotations

import torch
from torch import Tensor


def relative_weight_error(w: Tensor, w_hat: Tensor) -> float:
    """``||W - W_hat||^2 / ||W||^2`` (0 for an all-zero ``W`` reproduced exactly)."""
    w = w.float()
    return float((w_hat.float() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12))


def relative_output_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """``||(W - W_hat) X^T||^2 / ||W X^T||^2`` computed from ``H`` proportional to ``X^T X``.

    Args:
        w: original weight, ``(rows, cols)``.
        w_hat: compressed weight, ``(rows, cols)``.
        hessian: ``(cols, cols)``, any positive multiple of ``X^T X``; or ``(g, cols, cols)``
            for a grouped convolution (group ``j``'s Hessian for its ``rows / g`` rows).
    """
    h = hessian.float()
    if h.dim() == 3:  # rows grouped: (g, rows/g, cols) against (g, cols, cols)
        w, w_hat = (
            w.reshape(h.shape[0], -1, w.shape[-1]),
            w_hat.reshape(h.shape[0], -1, w.shape[-1]),
        )

    def quadratic(m: Tensor) -> Tensor:  # sum of the rows' m_r H m_r^T, accumulated in float64
        return (m @ h).mul_(m).sum(dtype=torch.float64)

    w = w.float()
    numerator = quadratic(w - w_hat.float())
    denominator = quadratic(w)
    if denominator <= 0:
        return 0.0 if numerator <= 0 else float("inf")
    return float(numerator / denominator)
