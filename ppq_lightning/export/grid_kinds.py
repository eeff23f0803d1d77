"""What the exporters need to know of a layer's grid kind (issue #29): integer, floating-point
(NVFP4, MXFP4, FP8) or GGUF K-quant.

Every exporter asks :func:`grid_kind` first and refuses or handles each kind: a floating-point
or K-quant grid has no ``zero`` per group and no ``centred`` flag, and treating it as an integer
grid would write wrong codes. :func:`zero_codes` gives the code of 0 wherever a layer's pruned
weights sit (the sparse encoding of the native format); ``compressed.state.grid_from_buffers``
rebuilds a grid from a state dict's buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.float_grid import FLOAT_FORMATS, FloatGrid
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.kquants import KINDS, KQuantGrid, zero_exact
from ppq_lightning.ops.quant_grid import QuantGrid

INT, FLOAT, KQUANT = "int", "float", "kquant"


def grid_kind(grid_format: str) -> str:
    """``"int"``, ``"float"`` (nvfp4, mxfp4, fp8, fp8_block) or ``"kquant"`` (Q4_K, Q5_K, Q6_K)
    for a state's ``grid_format``.

    Raises:
        PPQConfigError: for a format no exporter knows (a newer grid kind).
    """
    if grid_format == INT:
        return INT
    if grid_format in FLOAT_FORMATS:
        return FLOAT
    if grid_format in KINDS:
        return KQUANT
    raise PPQConfigError(
        f"grid_format={grid_format!r} is a grid kind the exporters do not know: allowed 'int', "
        f"{', '.join(repr(f) for f in (*FLOAT_FORMATS, *KINDS))}."
    )


def zero_codes(grid: Grid, cols: int) -> Tensor | None:
    """The code of the value 0 at every position of a ``(rows, cols)`` weight on ``grid``
    (int64), or None where some group has no exact 0 (a K-quant grid read from a llama.cpp file).

    Integer grids: the group's zero point; floating-point grids: code 0 everywhere; K-quants:
    each sub-block's zero code ``dmin*m / (d*sc)``.
    """
    if isinstance(grid, FloatGrid):
        return torch.zeros(grid.shape, dtype=torch.int64)
    if isinstance(grid, KQuantGrid):
        if not bool(zero_exact(grid).all()):
            return None
        zero = torch.clamp(torch.round(grid.zero), 0, grid.maxq)
        return grid._expand(zero, cols).to(torch.int64).cpu()
    if isinstance(grid, QuantGrid):
        return grid._expand(grid.zero, cols).to(torch.int64).cpu()
    return None
