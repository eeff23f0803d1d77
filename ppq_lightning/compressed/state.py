"""Compressed state recorded on modules: mask, quantization grid and stage history.

Each compressed module (an ``nn.Linear`` or a convolution) carries a child module
``ppq_state`` (a :class:`CompressionState`). Its buffers (``mask_bits`` and the grid's tensors:
``scale``/``zero`` for an integer grid, ``scale``/``global_scale`` for a floating-point one,
``d``/``dmin``/``sc``/``m`` for a GGUF K-quant) and its extra state (grid format and settings,
history) travel with ``state_dict()`` and therefore with
every Lightning checkpoint. A fresh model gets its ``ppq_state`` children (and the structural
edits they record) when it loads such a state dict through
``ppq_lightning.edits.enable_state_loading``; ``ppq_lightning.compressed.invariants`` checks
the weights against the recorded state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.modules.views import as_matrix, to_weight_layout
from ppq_lightning.ops.float_grid import FLOAT_FORMATS, FloatGrid
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.grid_formats import GRID_FORMATS, INT
from ppq_lightning.ops.kquants import KINDS as KQUANT_FORMATS
from ppq_lightning.ops.kquants import KQuantGrid
from ppq_lightning.ops.masks import pack_mask, unpack_mask
from ppq_lightning.ops.quant_grid import QuantGrid

STATE_NAME = "ppq_state"
GRID_BUFFERS = ("scale", "zero", "global_scale", "d", "dmin", "sc", "m")
"""The buffers a grid is recorded in (float32, whatever the model's dtype): ``scale``/``zero``
(integer), ``scale``/``global_scale`` (floating-point), ``d``/``dmin``/``sc``/``m`` (K-quant)."""


class CompressionState(nn.Module):
    """What compression stages did to the weight of the module that owns this child.

    Attributes:
        mask: bool tensor shaped like the weight (True = kept), or None if never pruned;
            stored packed, one bit per weight (buffer ``mask_bits``), and unpacked on access.
        grid_format: the format of the last quantization's grid (``ops.grid_formats``:
            ``"int"``, ``"nvfp4"``, ``"mxfp4"``, ``"fp8"``, ``"fp8_block"``, ``"Q4_K"``,
            ``"Q5_K"``, ``"Q6_K"``); its tensors are the buffers :data:`GRID_BUFFERS` lists.
        scale, zero: an integer grid's parameters ``(rows, n_groups)``, or None.
        bits, group_size, symmetric: settings of that grid (for the other formats, the values
            the format fixes: bits of a stored value, input columns per scale).
        grid_shape: the ``(rows, cols)`` of a floating-point grid's matrix.
        history: one :class:`~ppq_lightning.compressed.history.HistoryEntry` per stage applied,
            in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask_bits", None)
        self.mask_shape: tuple[int, ...] | None = None
        for name in GRID_BUFFERS:
            self.register_buffer(name, None)
        self.grid_format: str = INT
        self.grid_shape: tuple[int, int] | None = None
        self.bits: int | None = None
        self.group_size: int | None = None
        self.symmetric: bool = False
        self.history: list[HistoryEntry] = []
        self.register_load_state_dict_pre_hook(_materialize_buffers)

    def _apply(self, fn: Any, recurse: bool = True) -> CompressionState:
        """Move the buffers as ``fn`` says (``module.to(device)``, ``.cuda()``), but keep the
        grid's ``scale`` and ``zero`` float32 whatever dtype the model is cast to
        (``model.to(torch.bfloat16)``, ``Trainer(precision="bf16-true")``): the grid is recorded
        in float32, and a bf16 weight is on it when it is a float32 grid value rounded once to
        bf16; a scale rounded to bf16 would be another grid."""
        grid = {n: self._buffers[n] for n in GRID_BUFFERS if self._buffers[n] is not None}
        super()._apply(fn, recurse)
        for name, kept in grid.items():
            self._buffers[name] = kept.to(device=self._buffers[name].device)
        return self

    @property
    def mask(self) -> Tensor | None:
        if self.mask_bits is None or self.mask_shape is None:
            return None
        return unpack_mask(self.mask_bits, self.mask_shape)

    @mask.setter
    def mask(self, mask: Tensor | None) -> None:
        self.mask_bits = None if mask is None else pack_mask(mask.bool())
        self.mask_shape = None if mask is None else tuple(mask.shape)

    @property
    def grid(self) -> Grid | None:
        """The recorded grid, of the class its format names, or None if never quantized."""
        if self.bits is None or (self.grid_format == INT and self.scale is None):
            return None
        return grid_from_buffers(self._buffers, self.get_extra_state())

    def set_grid(self, grid: Grid, device: torch.device) -> None:
        """Record ``grid`` (any kind) in float32 on ``device``, replacing an older grid."""
        for name in GRID_BUFFERS:
            self._buffers[name] = None
        if isinstance(grid, QuantGrid):
            self.grid_format, self.grid_shape = INT, None
            tensors = {"scale": grid.scale, "zero": grid.zero}
        elif isinstance(grid, FloatGrid):
            self.grid_format, self.grid_shape = grid.format, tuple(grid.shape)
            tensors = {"scale": grid.scale, "global_scale": grid.global_scale}
        elif isinstance(grid, KQuantGrid):
            self.grid_format, self.grid_shape = grid.kind, None
            tensors = {"d": grid.d, "dmin": grid.dmin, "sc": grid.sc, "m": grid.m}
        else:
            raise TypeError(f"cannot record a grid of type {type(grid).__name__}")
        for name, tensor in tensors.items():
            if tensor is not None:
                self._buffers[name] = tensor.to(device, torch.float32)
        self.bits, self.group_size, self.symmetric = grid.bits, grid.group_size, grid.symmetric

    @property
    def stages(self) -> list[str]:
        return [entry["stage"] for entry in self.history]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "grid_format": self.grid_format,
            "grid_shape": list(self.grid_shape) if self.grid_shape is not None else None,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "mask_shape": list(self.mask_shape) if self.mask_shape is not None else None,
            "history": [dict(entry) for entry in self.history],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits = state["bits"]
        self.grid_format = state.get("grid_format", INT)  # states written before #29: integer
        shape = state.get("grid_shape")
        self.grid_shape = tuple(shape) if shape is not None else None
        self.group_size = state["group_size"]
        self.symmetric = state["symmetric"]
        shape = state.get("mask_shape")
        self.mask_shape = tuple(shape) if shape is not None else None
        self.history = [dict(entry) for entry in state["history"]]

    def extra_repr(self) -> str:
        parts = []
        if self.mask is not None:
            parts.append(f"sparsity={1 - self.mask.float().mean().item():.3f}")
        if self.bits is not None:
            kind = f"format={self.grid_format}, " if self.grid_format != INT else ""
            parts.append(f"{kind}bits={self.bits}, group_size={self.group_size}")
        parts.append(f"stages={self.stages}")
        return ", ".join(parts)


def grid_from_buffers(buffers: Mapping[str, Tensor | None], extra: Mapping[str, Any]) -> Grid:
    """The grid a compression state records, from its buffers (:data:`GRID_BUFFERS`: ``scale``,
    ``d``, ...) and its extra state (``grid_format``, ``bits``, ``group_size``, ``symmetric``,
    ``grid_shape``), whether on a module or read from a file.

    Raises:
        PPQConfigError: for an unknown grid format or a missing buffer.
    """
    grid_format = extra.get("grid_format", INT)
    if grid_format == INT:
        needed: tuple[str, ...] = ("scale", "zero")
    elif grid_format in FLOAT_FORMATS:
        needed = ("scale",)
    elif grid_format in KQUANT_FORMATS:
        needed = ("d", "dmin", "sc", "m")
    else:
        raise bad_value("grid_format", grid_format, f"one of {', '.join(GRID_FORMATS)}")
    missing = [name for name in needed if buffers.get(name) is None]
    if missing:
        raise PPQConfigError(f"a {grid_format} grid is recorded without its buffers {missing}.")
    if grid_format == INT:
        return QuantGrid(
            buffers["scale"],
            buffers["zero"],
            extra["bits"],
            extra["group_size"],
            extra["symmetric"],
        )
    if grid_format in FLOAT_FORMATS:
        shape = tuple(extra.get("grid_shape") or ())
        return FloatGrid(buffers["scale"], buffers.get("global_scale"), grid_format, shape)
    return KQuantGrid(grid_format, buffers["d"], buffers["dmin"], buffers["sc"], buffers["m"])


def _materialize_buffers(module: CompressionState, state_dict: dict, prefix: str, *args) -> None:
    """Give still-empty buffers the shape of the tensors about to be loaded into them."""
    for name in ("mask_bits", *GRID_BUFFERS):
        key = prefix + name
        if key in state_dict and getattr(module, name) is None:
            module._buffers[name] = torch.empty_like(state_dict[key])


def get_state(module: nn.Module) -> CompressionState | None:
    """The :class:`CompressionState` of ``module``, or None if it was never compressed."""
    state = getattr(module, STATE_NAME, None)
    return state if isinstance(state, CompressionState) else None


def ensure_state(module: nn.Module) -> CompressionState:
    """The :class:`CompressionState` of ``module``, created if missing."""
    state = get_state(module)
    if state is None:
        weight = getattr(module, "weight", None)  # a view owns no parameter (modules.attention)
        tensor = weight if isinstance(weight, Tensor) else next(module.parameters(), None)
        state = CompressionState()
        if tensor is not None:
            state = state.to(tensor.device)
        module.add_module(STATE_NAME, state)
    return state


def current_mask(module: nn.Module) -> Tensor | None:
    """The recorded mask of ``module`` as an ``(out, in)`` matrix, or None if never pruned."""
    state = get_state(module)
    return None if state is None or state.mask is None else as_matrix(module, state.mask)


def current_grid(module: nn.Module) -> Grid | None:
    """The recorded quantization grid of ``module``, or None if never quantized."""
    state = get_state(module)
    return None if state is None else state.grid


def record_stage(module: nn.Module, entry: HistoryEntry) -> CompressionState:
    """Append a stage's record to the history of ``module`` (once per stage and module)."""
    state = ensure_state(module)
    state.history.append(dict(entry))
    return state


def record_mask(module: nn.Module, mask: Tensor) -> CompressionState:
    """Zero the pruned weights of ``module`` and record ``mask`` (combined with any older one).

    Args:
        module: the compressed layer.
        mask: bool, True = kept, in the ``(out, in)`` matrix layout of ``weight_matrix``.
    """
    state = ensure_state(module)
    mask = to_weight_layout(module, mask.to(device=module.weight.device, dtype=torch.bool))
    if state.mask is not None:
        mask = mask & state.mask
    module.weight.data.masked_fill_(~mask, 0)  # +0.0, never -0.0: zeros are bit-exact
    state.mask = mask.contiguous()
    return state


def record_grid(module: nn.Module, grid: Grid) -> CompressionState:
    """Record ``grid`` (an integer, floating-point or K-quant grid) as the module's
    quantization grid (replacing an older one)."""
    state = ensure_state(module)
    state.set_grid(grid, module.weight.device)
    return state


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, CompressionState]]:
    """Every ``(name, module, state)`` of ``model`` that carries a compression state."""
    for name, module in model.named_modules():
        state = get_state(module)
        if state is not None:
            yield name, module, state


def applied_stages(model: nn.Module) -> set[str]:
    """The state keys of every stage recorded anywhere in ``model``."""
    return {stage for _, _, state in compressed_modules(model) for stage in state.stages}
