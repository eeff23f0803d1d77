"""Straight-through estimators: a hard (non-differentiable) forward with a usable gradient.

Each function returns exactly the hard value in the forward pass (no rounding error is added)
and takes its gradient from a surrogate: ``hard.detach() + (soft - soft.detach())`` evaluates to
``hard`` bit for bit, and differentiates as ``soft``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppq_lightning.ops.quant_grid import QuantGrid


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    return hard.detach() + (soft - soft.detach())


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward (half to even, as ``torch.round``), identity gradient."""
    return straight_through(torch.round(x), x)


def fake_quantize_ste(w: Tensor, grid: QuantGrid) -> Tensor:
    """``w`` (rows, cols) rounded onto ``grid`` in the forward pass (in ``w``'s dtype), with the
    identity gradient (no clipping: a min-max grid of ``w`` itself covers all of ``w``)."""
    return straight_through(grid.fake_quantize(w).to(w.dtype), w)
