"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh, 2023).

In each block of columns the mask is chosen by the saliency ``w^2 / [H^-1]_ii^2``; then, column
by column, pruned weights become 0 (and, in joint mode or on an existing grid, survivors are
quantized) and the error is spread over the columns not yet processed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.ops.hessian import prepare_hessian
from ppq_lightning.ops.masks import check_sparsity
from ppq_lightning.ops.obs import ColumnGrid, check_matrices, walk_columns
from ppq_lightning.ops.quant_grid import QuantGrid, check_bits, check_group_size


class SparseGPTResult(NamedTuple):
    """Outcome of :func:`sparsegpt`: the weight, its mask (True = kept) and grid (or None)."""

    weight: Tensor
    mask: Tensor
    grid: QuantGrid | None
    loss: float
    damp: float
    retries: int


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest of ``scores`` (``0 < k``): the entries below the k-th
    smallest value and those equal to it, found by selection (``kthvalue``, linear time) rather
    than by ``topk``, which partially sorts the half of the block it returns. When the k-th
    value is tied with entries beyond it, which of the ties ``topk`` drops is its own choice:
    then ``topk`` decides, so the mask is always ``topk``'s."""
    flat = scores.flatten()
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(flat, k).values
    mask = flat <= kth
    if int(mask.sum()) != k:  # ties at the k-th value: keep topk's choice among them
        mask = torch.zeros_like(mask)
        mask[torch.topk(flat, k, largest=False).indices] = True
    return mask.view_as(scores)


def sparsegpt(
    w: Tensor,
    h: Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    keep: Tensor | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    grid: QuantGrid | None = None,
) -> SparseGPTResult:
    """Prune ``w`` (rows, cols) with SparseGPT given the layer Hessian ``h``.

    Args:
        w: weight matrix.
        h: Hessian ``2 X^T X / N`` of the layer inputs.
        sparsity: fraction pruned in every block of columns (unstructured); or
        nm: ``(N, M)``: keep N of every M consecutive columns in each row.
        block_size: columns per block (rounded down to a multiple of M for N:M).
        damp: relative damping of the Hessian.
        keep: existing mask; its pruned entries stay pruned and count towards the target.
        bits, group_size, symmetric: joint mode, quantize the survivors onto a new grid.
        grid: an existing grid: survivors are re-projected onto it (the layer stays quantized).

    Raises:
        PPQConfigError: unless exactly one of sparsity/nm is given, with both bits and grid, or
            on bad shapes, block size, damping or pattern width.
    """
    check_matrices(w, h, block_size)
    rows, cols = w.shape
    if (sparsity is None) == (nm is None):
        raise PPQConfigError(f"sparsity={sparsity!r}, pattern={nm!r}: give exactly one.")
    if sparsity is not None:
        check_sparsity(sparsity)
    else:
        n, m = nm
        if not 0 < n < m or cols % m:
            raise bad_value("pattern", f"{n}:{m}", f"0 < N < M with M dividing {cols}")
        block_size = max(m, block_size - block_size % m)
    if bits is not None and grid is not None:
        raise PPQConfigError("bits and grid are exclusive: joint mode makes a new grid.")
    if bits is not None:
        check_bits(bits)
        check_group_size(group_size, cols)
    if keep is not None and tuple(keep.shape) != (rows, cols):
        raise bad_value("keep", tuple(keep.shape), f"a ({rows}, {cols}) bool mask")
    wt = w.detach().float().T.contiguous()  # (cols, rows): a copy, walked in place
    h = h.to(wt.device)
    wt[torch.diag(h) == 0] = 0
    quantizing = bits is not None or grid is not None
    columns = ColumnGrid(wt, bits, group_size, symmetric, grid) if quantizing else None
    prep = prepare_hessian(h, damp)
    kept_t = torch.ones_like(wt, dtype=torch.bool)
    fixed_pruned = ~keep.to(wt.device).T if keep is not None else None

    def prune_block(i1: int, i2: int, block: Tensor, hinv_block: Tensor) -> Tensor:
        saliency = block**2 / torch.diagonal(hinv_block)[:, None] ** 2  # (block, rows)
        fixed = fixed_pruned[i1:i2] if fixed_pruned is not None else None
        if fixed is not None:
            saliency[fixed] = -torch.inf
        if sparsity is not None:
            pruned = torch.zeros_like(block, dtype=torch.bool)
            n_prune = round(sparsity * saliency.numel())
            if fixed is not None:
                n_prune = max(n_prune, int(fixed.sum()))
            if n_prune:
                pruned = _lowest(saliency, n_prune)
        else:  # N:M along the columns of each row: groups of M consecutive walk positions
            groups = saliency.T.reshape(saliency.shape[1], -1, m)  # (rows, block / M, M)
            drop = torch.topk(groups, m - n, dim=2, largest=False).indices
            pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, drop, True)
            pruned = pruned.reshape(saliency.shape[1], -1).T
            if fixed is not None:
                pruned = pruned | fixed
        kept_t[i1:i2] = ~pruned
        return pruned

    loss = walk_columns(wt, prep.hinv.to(wt.device), block_size, columns, None, prune_block)
    return SparseGPTResult(
        wt.T.contiguous(),
        kept_t.T.contiguous(),
        columns.grid if columns else None,
        loss,
        prep.damp,
        prep.retries,
    )
