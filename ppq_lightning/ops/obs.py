"""The OBS column walk shared by GPTQ and SparseGPT (Frantar et al.).

Both solvers visit the columns of ``W`` (rows, cols) in order; each column is replaced by its
target value ``q`` (rounded onto a grid, and/or zeroed where pruned) and the error is spread over
the columns not yet visited with the upper Cholesky factor ``U`` of ``H^-1``:
``err = (w_i - q_i) / U_ii;  W[:, j] -= err * U_ij  for j > i``. Updates beyond the current block
of ``block_size`` columns are applied lazily, once per block, as one matrix product.

The walk runs on the transposed weight (cols, rows), so that a column is one contiguous row in
memory, and never synchronises with the device inside the loop (the loss stays a tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value, check_int
from ppq_lightning.ops.quant_grid import QuantGrid, compute_grid


def check_matrices(w: Tensor, h: Tensor, block_size: int) -> None:
    """Validate the inputs shared by the OBS solvers.

    Raises:
        PPQConfigError: on a non 2-D weight, a Hessian not ``(cols, cols)``, or a bad block size.
    """
    if w.dim() != 2:
        raise bad_value("W", tuple(w.shape), "a 2-D weight matrix (rows, cols)")
    if tuple(h.shape) != (w.shape[1], w.shape[1]):
        raise bad_value("H", tuple(h.shape), f"a ({w.shape[1]}, {w.shape[1]}) Hessian")
    check_int("block_size", block_size, minimum=1)


class ColumnGrid:
    """Rounds the columns of a transposed weight ``wt`` (cols, rows) while a solver walks them.

    A fixed grid is used as is; otherwise the grid of each group is computed from the current
    (error-updated) weights when the walk reaches the group's first column, as GPTQ does
    (per-channel grids, and all grids when ``static``, are computed once up front).

    Args:
        wt: the transposed weight, walked in place.
        bits, group_size, symmetric: the grid to build (ignored when ``grid`` is given).
        grid: an existing grid to round onto.
        static: compute group grids up front (GPTQ's act-order with groups).
    """

    def __init__(
        self,
        wt: Tensor,
        bits: int | None,
        group_size: int | None,
        symmetric: bool,
        grid: QuantGrid | None = None,
        static: bool = False,
    ) -> None:
        cols, rows = wt.shape
        self.group_size = (grid.group_size if grid is not None else group_size) or cols
        self.dynamic = grid is None and group_size is not None and not static
        if grid is not None:
            self.grid = grid.to(wt.device)
        elif not self.dynamic:
            self.grid = compute_grid(wt.T, bits, group_size, symmetric)
        else:
            n_groups = cols // group_size
            ones = torch.ones(rows, n_groups, device=wt.device)
            self.grid = QuantGrid(ones, torch.zeros_like(ones), bits, group_size, symmetric)
        self.maxq = self.grid.maxq
        # per-group copies (n_groups, rows), contiguous, so a column's scale is one row
        self._scale = self.grid.scale.T.contiguous()
        self._zero = self.grid.zero.T.contiguous()

    def __call__(self, column: int, position: int, wt: Tensor) -> Tensor:
        """The rounded copy of ``wt[position]``, which holds original column ``column``."""
        if self.dynamic and column % self.group_size == 0:
            g, gs = column // self.group_size, self.group_size
            fresh = compute_grid(
                wt[position : position + gs].T, self.grid.bits, None, self.grid.symmetric
            )
            self.grid.scale[:, g], self.grid.zero[:, g] = fresh.scale[:, 0], fresh.zero[:, 0]
            self._scale[g], self._zero[g] = fresh.scale[:, 0], fresh.zero[:, 0]
        g = column // self.group_size
        scale, zero = self._scale[g], self._zero[g]
        q = torch.round(wt[position] / scale).add_(zero).clamp_(0, self.maxq)
        return q.sub_(zero).mul_(scale)


def aligned_block_size(block_size: int, group_size: int | None) -> int:
    """A lazy-update block size under which no quantization group starts inside one block and
    ends in the next (``block_size`` itself when it is a multiple or a divisor of the group).

    A group's grid is computed from the current weights when the walk reaches its first column;
    the columns of a later block have not received the current block's error updates yet, so a
    group straddling two blocks would get a grid that depends on the block size.
    """
    if group_size is None or block_size % group_size == 0 or group_size % block_size == 0:
        return block_size
    return group_size * max(1, block_size // group_size)


def walk_columns(
    wt: Tensor,
    hinv: Tensor,
    block_size: int,
    round_column: Callable[[int, Tensor], Tensor] | None = None,
    prune_block: Callable[[int, int, Tensor, Tensor], Tensor | None] | None = None,
) -> float:
    """Walk the columns of ``wt`` (cols, rows) in place; returns the OBS loss ``sum err^2 / 2``.

    Args:
        wt: transposed float32 weight, in walk order; overwritten with the targets.
        hinv: ``(cols, cols)`` upper Cholesky factor of the damped ``H^-1``, in walk order.
        block_size: columns per lazy-update block.
        round_column: ``(position, wt) -> q``, the rounded copy of ``wt[position]``; None keeps
            the column's value (pruning only).
        prune_block: ``(i1, i2, block, hinv_block) -> pruned`` called at the start of each block
            with the current weights ``wt[i1:i2]``; returns a bool ``(i2 - i1, rows)`` of entries
            to set to 0, or None.
    """
    cols = wt.shape[0]
    loss = wt.new_zeros(())
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = wt[i1:i2], hinv[i1:i2, i1:i2]
        pruned = prune_block(i1, i2, w1, hinv1) if prune_block is not None else None
        err1 = torch.empty_like(w1)
        diag = torch.diagonal(hinv1)
        for i in range(i2 - i1):
            column = w1[i]
            q = round_column(i1 + i, wt) if round_column is not None else column.clone()
            if pruned is not None:
                q.masked_fill_(pruned[i], 0)
            err = torch.sub(column, q).div_(diag[i])
            w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)
            column.copy_(q)
            err1[i] = err
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
        loss += err1.square().sum()
    return float(loss) / 2
