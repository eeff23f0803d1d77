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
        hessian: ``(cols, cols)``, any positive multiple of ``X^T X``.
    """
    h = hessian.to(torch.float64)
    delta = (w - w_hat).to(torch.float64)  # (rows, cols)
    w = w.to(torch.float64)
    denominator = ((w @ h) * w).sum()
    if denominator <= 0:
        return 0.0 if ((delta @ h) * delta).sum() <= 0 else float("inf")
    return float(((delta @ h) * delta).sum() / denominator)
