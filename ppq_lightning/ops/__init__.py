"""Pure tensor math, one algorithm per file: quantization grids, pruning masks, Hessians, the
OBS column walk (GPTQ, SparseGPT), Wanda, channel importance, basis sharing, CoDeQ's dead-zone
quantizer, straight-through estimators, projection onto a mask and grid. Tensors in, tensors
(or NamedTuples of them) out; no Lightning, no logging."""

from ppq_lightning.ops.float_grid import FLOAT_FORMATS, FloatGrid, compute_float_grid
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
    "FLOAT_FORMATS",
    "FloatGrid",
    "QuantGrid",
    "check_bits",
    "check_group_size",
    "check_sparsity",
    "compute_float_grid",
    "compute_grid",
    "global_masks",
    "nm_mask",
    "parse_pattern",
    "row_mask",
    "unstructured_mask",
]
