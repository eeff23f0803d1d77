"""What the exporters need to know of a layer's grid kind (issue #29): integer, floating-point
(NVFP4, MXFP4, FP8) or GGUF K-quant.

Every exporter asks :func:`grid_kind` first and refuses or handles each kind: a floating-point
or K-quant grid has no ``zero`` per group and no ``centred`` flag, and treating it as an integer
grid would write wrong codes. :func:`zero_codes` gives the code of 0 wherever a layer's pruned
weights sit (the sparse encoding of the native format), and :func:`recorded_grid` rebuilds a grid
from a state dict's buffers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.float_grid import FLOAT_FORMATS, FloatGrid
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.kquants import KINDS, KQuantGrid, zero_exact
from ppq_lightning.ops.quant_grid import QuantGrid

INT, FLOAT, KQUANT = "int", "float", "kquant"
GRID_BUFFERS = ("scale", "zero", "global_scale", "d", "dmin", "sc", "m")
"""The buffers of a :class:`~ppq_lightning.compressed.state.CompressionState` that hold its grid."""


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


def recorded_grid(buffers: dict[str, Any], extra: dict[str, Any]) -> Grid:
    """The grid a compression state records, from its buffers (``scale``, ``d``, ...) and its
    extra state (``grid_format``, ``bits``, ``grid_shape``, ...), as ``CompressionState.grid``
    builds it.

    Raises:
        PPQConfigError: for an unknown grid format or a missing buffer.
    """
    grid_format = extra.get("grid_format", INT)
    kind = grid_kind(grid_format)
    needed = {INT: ("scale", "zero"), FLOAT: ("scale",), KQUANT: ("d", "dmin", "sc", "m")}[kind]
    missing = [name for name in needed if buffers.get(name) is None]
    if missing:
        raise PPQConfigError(f"a {grid_format} grid is recorded without its buffers {missing}.")
    if kind == INT:
        return QuantGrid(
            buffers["scale"],
            buffers["zero"],
            extra["bits"],
            extra["group_size"],
            extra["symmetric"],
        )
    if kind == FLOAT:
        shape = tuple(extra.get("grid_shape") or ())
        return FloatGrid(buffers["scale"], buffers.get("global_scale"), grid_format, shape)
    return KQuantGrid(grid_format, buffers["d"], buffers["dmin"], buffers["sc"], buffers["m"])
