"""GPTQ: column-by-column quantization with second-order error feedback (Frantar et al.).

For each column ``i`` (in blocks of ``block_size`` with lazy updates): quantize it, then spread
its error over the columns not yet quantized,
``err = (w_i - q_i) / [H^-1]_ii;  W[:, i:] -= err (x) [H^-1]_{i, i:}``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value
from ppq_lightning.ops.hessian import prepare_hessian
from ppq_lightning.ops.quant_grid import QuantGrid, check_bits, check_group_size, compute_grid


class GPTQResult(NamedTuple):
    """Outcome of :func:`gptq` (and of the joint mode of SparseGPT)."""

    weight: Tensor
    grid: QuantGrid
    loss: float
    damp: float
    retries: int


def check_matrices(w: Tensor, h: Tensor, block_size: int) -> None:
    """Validate the inputs shared by the OBS solvers.

    Raises:
        PPQConfigError: on a non 2-D weight, a Hessian not ``(cols, cols)``, or a bad block size.
    """
    if w.dim() != 2:
        raise bad_value("W", tuple(w.shape), "a 2-D weight matrix (rows, cols)")
    if tuple(h.shape) != (w.shape[1], w.shape[1]):
        raise bad_value("H", tuple(h.shape), f"a ({w.shape[1]}, {w.shape[1]}) Hessian")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise bad_value("block_size", block_size, "an integer >= 1")


class ColumnGrid:
    """The grid of each column while a solver walks the columns.

    A fixed grid is used as is; otherwise the grid of each group is computed from the current
    (error-updated) weights when the walk reaches the group's first column, as GPTQ does
    (per-channel grids are computed once, from the whole matrix, up front).
    """

    def __init__(
        self,
        w: Tensor,
        bits: int | None,
        group_size: int | None,
        symmetric: bool,
        grid: QuantGrid | None = None,
        static: bool = False,
    ) -> None:
        rows, cols = w.shape
        self.group_size = (grid.group_size if grid is not None else group_size) or cols
        if grid is not None:
            self.grid, self.dynamic = grid.to(w.device), False
        elif group_size is None or static:
            self.grid, self.dynamic = compute_grid(w, bits, group_size, symmetric), False
        else:
            n_groups = cols // group_size
            self.grid = QuantGrid(
                torch.ones(rows, n_groups, device=w.device),
                torch.zeros(rows, n_groups, device=w.device),
                bits,
                group_size,
                symmetric,
            )
            self.dynamic = True

    def quantize(self, column: int, w: Tensor, upcoming: Tensor | None = None) -> Tensor:
        """Round ``w`` (rows,), the weights of original column ``column``, to its grid.

        Args:
            upcoming: current weights of the group starting at ``column`` (dynamic grids).
        """
        g = column // self.group_size
        if self.dynamic and column % self.group_size == 0:
            fresh = compute_grid(upcoming, self.grid.bits, None, self.grid.symmetric)
            self.grid.scale[:, g], self.grid.zero[:, g] = fresh.scale[:, 0], fresh.zero[:, 0]
        scale, zero = self.grid.scale[:, g], self.grid.zero[:, g]
        q = torch.clamp(torch.round(w / scale) + zero, 0, self.grid.maxq)
        return scale * (q - zero)


def gptq(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    mask: Tensor | None = None,
    grid: QuantGrid | None = None,
) -> GPTQResult:
    """Quantize ``w`` (rows, cols) with GPTQ, given the layer Hessian ``h`` (cols, cols).

    Args:
        w: weight matrix.
        h: Hessian ``2 X^T X / N`` of the layer inputs.
        bits, group_size, symmetric: the grid (ignored when ``grid`` is given).
        act_order: walk the columns by decreasing Hessian diagonal; with groups the group grids
            are then computed up front, so groups stay contiguous in the original order.
        block_size: columns per lazy-update block (speed only).
        damp: relative damping of the Hessian.
        mask: bool (rows, cols), True = kept: pruned entries quantize to exactly 0 and their
            error is propagated (GPTQ with a fixed mask).
        grid: quantize onto this existing grid instead of computing one.

    Returns:
        The quantized weight (float32, on the grid, zero where ``mask`` is False), the grid,
        the summed OBS loss, the damping used and how often it was raised.

    Raises:
        PPQConfigError: on bad bits, group size, shapes, block size or damping.
    """
    check_matrices(w, h, block_size)
    rows, cols = w.shape
    if grid is None:
        check_bits(bits)
        check_group_size(group_size, cols)
    if mask is not None and tuple(mask.shape) != (rows, cols):
        raise bad_value("mask", tuple(mask.shape), f"a ({rows}, {cols}) bool mask")
    w = w.detach().float().clone()
    h = h.to(w.device)
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    perm = perm.to(w.device)
    columns = ColumnGrid(w, bits, group_size, symmetric, grid, static=act_order)
    prep = prepare_hessian(h[perm][:, perm], damp)
    hinv = prep.hinv.to(w.device)
    w, keep = w[:, perm], (mask.to(w.device)[:, perm] if mask is not None else None)
    q_all = torch.zeros_like(w)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, hinv1 = (
            w[:, i1:i2].clone(),
            torch.zeros(rows, i2 - i1, device=w.device),
            hinv[i1:i2, i1:i2],
        )
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            upcoming = None
            if columns.dynamic and column % columns.group_size == 0:
                upcoming = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : columns.group_size]
            q = columns.quantize(column, w1[:, i], upcoming)  # (rows,)
            if keep is not None:
                q = q * keep[:, i1 + i]
            d = hinv1[i, i]
            loss += float(((w1[:, i] - q) ** 2).sum() / d**2 / 2)
            err = (w1[:, i] - q) / d
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            q_all[:, i1 + i], err1[:, i] = q, err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    result = torch.empty_like(q_all)
    result[:, perm] = q_all
    return GPTQResult(result, columns.grid, loss, prep.damp, prep.retries)
