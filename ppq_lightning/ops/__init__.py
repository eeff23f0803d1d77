"""Pure tensor math: quantization grids, pruning masks. No Lightning, no logging."""

from ppq_lightning.ops.masks import (
    check_sparsity,
    global_masks,
    nm_mask,
    parse_pattern,
    row_mask,
    unstructured_mask,
)
from ppq_lightning.ops.quant_grid import QuantGrid, check_bits, check_group_size, compute_grid

__all__ = [
    "QuantGrid",
    "check_bits",
    "check_group_size",
    "check_sparsity",
    "compute_grid",
    "global_masks",
    "nm_mask",
    "parse_pattern",
    "row_mask",
    "unstructured_mask",
]
