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
from ppq_lightning.ops.float_grid import FloatGrid
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.kquants import KQuantGrid
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

    A fixed grid (of any kind: integer, floating-point, K-quant) is used as is; otherwise the
    integer grid of each group is computed from the current (error-updated) weights when the
    walk reaches the group's first column, as GPTQ does (per-channel grids, and all grids when
    ``static``, are computed once up front).

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
        grid: Grid | None = None,
        static: bool = False,
    ) -> None:
        cols, rows = wt.shape
        self.group_size = (grid.group_size if grid is not None else group_size) or cols
        self.dynamic = grid is None and group_size is not None and not static
        self._float: FloatGrid | None = None
        if isinstance(grid, FloatGrid):  # scales fixed: one (rows,) scale per column group
            self.grid = self._float = grid.to(wt.device)
            self._scale = self._float.column_scales().T.contiguous()  # (n_groups, rows)
            self._scales = list(self._scale)
            return
        if isinstance(grid, KQuantGrid):  # its levels as an affine integer grid, bit for bit
            self.grid = grid.to(wt.device)
            self._set_affine(grid.as_quant_grid().to(wt.device))
            return
        if grid is not None:
            self.grid = grid.to(wt.device)
        elif not self.dynamic:
            self.grid = compute_grid(wt.T, bits, group_size, symmetric)
        else:
            n_groups = cols // group_size
            ones = torch.ones(rows, n_groups, device=wt.device)
            self.grid = QuantGrid(ones, torch.zeros_like(ones), bits, group_size, symmetric)
        self._set_affine(self.grid)

    def _set_affine(self, grid: QuantGrid) -> None:
        self.maxq = grid.maxq
        # per-group copies (n_groups, rows), contiguous, so a column's scale is one row; and
        # their rows as a list of views (a list index costs less than a tensor index)
        self._scale = grid.scale.T.contiguous()
        self._zero = grid.zero.T.contiguous()
        self._scales, self._zeros = list(self._scale), list(self._zero)

    def __call__(self, column: int, position: int, wt: Tensor, current: Tensor) -> Tensor:
        """The rounded copy of ``current`` (``wt[position]``, original column ``column``)."""
        g = column // self.group_size
        if self.dynamic and column % self.group_size == 0:
            gs = self.group_size
            fresh = compute_grid(
                wt[position : position + gs].T, self.grid.bits, None, self.grid.symmetric
            )
            self.grid.scale[:, g], self.grid.zero[:, g] = fresh.scale[:, 0], fresh.zero[:, 0]
            self._scale[g], self._zero[g] = fresh.scale[:, 0], fresh.zero[:, 0]
        if self._float is not None:
            return self._float.round_scaled(current, self._scales[g])
        scale, zero = self._scales[g], self._zeros[g]
        q = torch.round(current / scale).add_(zero).clamp_(0, self.maxq)
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
    grid: ColumnGrid | None = None,
    order: list[int] | None = None,
    prune_block: Callable[[int, int, Tensor, Tensor], Tensor | None] | None = None,
) -> float:
    """Walk the columns of ``wt`` (cols, rows) in place; returns the OBS loss ``sum err^2 / 2``.

    Args:
        wt: transposed float32 weight, in walk order; overwritten with the targets.
        hinv: ``(cols, cols)`` upper Cholesky factor of the damped ``H^-1``, in walk order.
        block_size: columns per lazy-update block.
        grid: rounds each column onto its grid; None keeps the column's value (pruning only).
        order: the original column of each walk position (None: the identity), for ``grid``.
        prune_block: ``(i1, i2, block, hinv_block) -> pruned`` called at the start of each block
            with the current weights ``wt[i1:i2]``; returns a bool ``(i2 - i1, rows)`` of entries
            to set to 0, or None.

    Raises:
        ValueError: with neither ``grid`` nor ``prune_block`` (nothing to walk towards).

    The loop body is a handful of tensor operations per column (Python's dispatch costs as much
    as their arithmetic at these sizes), each the reference implementations' own operation, so
    the result is theirs bit for bit (``tests/callbacks/test_reference_weights.py``).
    """
    if grid is None and prune_block is None:
        raise ValueError("walk_columns: give a grid, a prune_block or both")
    cols = wt.shape[0]
    loss = wt.new_zeros(())
    zero = wt.new_zeros(())
    diagonal = torch.diagonal(hinv).tolist()  # Python floats, exactly the float32 values
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = wt[i1:i2], hinv[i1:i2, i1:i2]
        pruned = prune_block(i1, i2, w1, hinv1) if prune_block is not None else None
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            position = i1 + i
            column, err = w1[i], err1[i]
            if grid is None:  # the target is the column with its pruned entries zeroed
                # err = column - target: the pruned entries, exactly 0 elsewhere
                torch.where(pruned[i], column, zero, out=err).div_(diagonal[position])
                w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)
                column.masked_fill_(pruned[i], 0)
                continue
            q = grid(order[position] if order is not None else position, position, wt, column)
            if pruned is not None:
                q.masked_fill_(pruned[i], 0)
            torch.sub(column, q, out=err).div_(diagonal[position])
            w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)
            column.copy_(q)
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
        loss += err1.square().sum()
    return float(loss) / 2
