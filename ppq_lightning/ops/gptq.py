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
from ppq_lightning.ops.obs import ColumnGrid, aligned_block_size, check_matrices, walk_columns
from ppq_lightning.ops.quant_grid import QuantGrid, check_bits, check_group_size


class GPTQResult(NamedTuple):
    """Outcome of :func:`gptq` (and of the joint mode of SparseGPT)."""

    weight: Tensor
    grid: QuantGrid
    loss: float
    damp: float
    retries: int


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
        block_size: columns per lazy-update block (speed only: with dynamic group grids it is
            lowered to a multiple of ``group_size`` when neither divides the other, see
            ``obs.aligned_block_size``).
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
    w = w.detach().float()
    h = h.to(w.device)
    dead = torch.diag(h) == 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    perm = perm.to(w.device)
    wt = w.T[perm].contiguous()  # (cols, rows) in walk order; a copy
    wt[dead[perm]] = 0
    columns = ColumnGrid(
        w.T.masked_fill(dead[:, None], 0), bits, group_size, symmetric, grid, act_order
    )
    prep = prepare_hessian(h[perm][:, perm] if act_order else h, damp)
    order = perm.tolist() if act_order else None
    prune_block = None
    if mask is not None:
        pruned = ~mask.to(w.device).T[perm]  # (cols, rows) in walk order

        def prune_block(i1: int, i2: int, block: Tensor, hinv_block: Tensor) -> Tensor:
            return pruned[i1:i2]

    if columns.dynamic:
        block_size = aligned_block_size(block_size, columns.group_size)
    loss = walk_columns(wt, prep.hinv.to(w.device), block_size, columns, order, prune_block)
    if act_order:  # back to the natural column order
        result = torch.empty_like(wt)
        result[perm] = wt
        wt = result
    return GPTQResult(wt.T.contiguous(), columns.grid, loss, prep.damp, prep.retries)
