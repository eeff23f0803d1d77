"""Mixed precision: which grid (bit width or format) each layer of a quantization stage gets.

Two rules, applied in this order by :func:`assign_grids`:

1. ``layer_bits``: ``{regex: bits or format}``; a layer whose name matches a regex
   (``re.search``, first match in the mapping's order) gets those bits on the stage's integer
   grid (its group size and symmetry), or that format (``"fp8"``, ``"nvfp4"``, ``"Q6_K"``, ...:
   ``ops.grid_formats``); 16 leaves it unquantized. On a stage of another format than ``int``
   a value must be a format or 16.
2. ``promote``: ``{"bits": B, "fraction": f}`` (``B`` bits or a format); of the remaining
   layers, the most sensitive ones (by the data-free sensitivity: relative error
   ``||W - Q(W)||^2 / ||W||^2`` of the stage's own round-to-nearest grid) get ``B``, until they
   hold at least ``f`` of the stage's weights.

Every other layer gets the stage's grid; for the mixture ``Q4_K_M`` that is llama.cpp's choice
per tensor (``ops.kquants.q4_k_m_types``: Q6_K on the first and last eighth of the attention-V
and FFN-down layers and on every third between, Q4_K elsewhere; a row length that 256 does not
divide falls back, as llama.cpp's does, to Q5_0 / Q8_0 blocks, i.e. a symmetric 5- / 8-bit
integer grid in groups of 32, or to no quantization). The measured average bits and C of the
result are reported by ``compression_summary`` (each layer's recorded grid counts at its own
width).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ppq_lightning.errors import PPQConfigError, bad_value, check_number
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.targets import compile_patterns
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.grid_formats import (
    GRID_FORMATS,
    INT,
    LEGACY_BLOCKS,
    MIXTURES,
    Q4_K_M,
    GridSpec,
    check_grid_format,
)
from ppq_lightning.ops.kquants import q4_k_m_types
from ppq_lightning.ops.quant_grid import OFF_BITS, check_bits
from ppq_lightning.ops.reconstruction import relative_weight_error

Width = int | str
"""A layer's bits on the stage's integer grid, or a grid format's name."""


def check_width(value: Width, argument: str, allow_off: bool = True) -> Width:
    """Validate bits (2-8, or 16 = off) or a grid format (canonically spelled; not a mixture).

    ``"int"`` alone is refused: a layer's integer grid is given by its bits.

    Raises:
        PPQConfigError: naming ``argument`` and what is allowed.
    """
    if not isinstance(value, str):
        return check_bits(value, argument, allow_off=allow_off)
    formats = [f for f in (*GRID_FORMATS, *LEGACY_BLOCKS) if f != INT]
    try:
        spelled = check_grid_format(value, argument, mixtures=False)
    except PPQConfigError:
        spelled = INT  # an unknown name: the same message
    if spelled == INT:
        off = ", or 16 (off)" if allow_off else ""
        raise bad_value(
            argument, value, f"bits from 2 to 8{off}, or a format: one of {', '.join(formats)}"
        )
    return spelled


def check_layer_bits(layer_bits: dict[str, Width] | None) -> dict[str, Width] | None:
    """Validate ``{regex: bits or format}`` (16 leaves the matched layers unquantized).

    Raises:
        PPQConfigError: on a non-mapping, an invalid regex, bits outside 2-8 or an unknown
            format.
    """
    if layer_bits is None:
        return None
    if not isinstance(layer_bits, dict) or not layer_bits:
        raise bad_value("layer_bits", layer_bits, "a non-empty mapping {regex: bits or format}")
    compile_patterns(list(layer_bits), "layer_bits")
    return {p: check_width(b, f"layer_bits[{p!r}]") for p, b in layer_bits.items()}


def check_promote(promote: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``{"bits": B, "fraction": f}`` (``B`` bits or a format) with ``0 < f <= 1``.

    Raises:
        PPQConfigError: on other keys, bits outside 2-8, an unknown format or a fraction
            outside (0, 1].
    """
    if promote is None:
        return None
    if not isinstance(promote, dict) or set(promote) != {"bits", "fraction"}:
        raise bad_value("promote", promote, 'a mapping {"bits": B, "fraction": f}')
    bits = check_width(promote["bits"], "promote.bits", allow_off=False)
    fraction = check_number("promote.fraction", promote["fraction"], 0, 1, low_open=True)
    return {"bits": bits, "fraction": float(fraction)}


def layer_grid(width: Width, stage: GridSpec, argument: str) -> GridSpec:
    """The grid a ``layer_bits``/``promote`` value gives a layer of a stage of grid ``stage``.

    Raises:
        PPQConfigError: bits other than 16 on a stage whose format is not ``int``.
    """
    if isinstance(width, str):
        return GridSpec.of(width)
    if width == OFF_BITS:
        return GridSpec(INT, OFF_BITS, None, False)
    if stage.format != INT:
        raise bad_value(
            argument, width, f"a grid format or 16 (off) on a stage of format {stage.format!r}"
        )
    return GridSpec.of(INT, width, stage.group_size, stage.symmetric)


def sensitivity(module: nn.Module, grid: GridSpec) -> float:
    """Relative round-to-nearest error ``||W - Q(W)||^2 / ||W||^2`` of ``module`` on ``grid``."""
    w = weight_matrix(module).float()
    return relative_weight_error(w, grid.compute(w).fake_quantize(w))


def gguf_names(names: list[str]) -> dict[str, str]:
    """The GGUF tensor name of each module name (``model.layers.3.mlp.down_proj`` ->
    ``blk.3.ffn_down.weight``), by the ``gguf`` package's llama name map, after any prefix the
    user's module adds (``model.``, ``net.``); names it does not map are left out."""
    import gguf

    blocks = [int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))]
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, max(blocks, default=0) + 1)
    found = {}
    for name in names:
        parts = name.split(".")
        for start in range(len(parts)):
            mapped = table.get_name(".".join(parts[start:]))
            if mapped is not None:
                found[name] = f"{mapped}.weight"
                break
    return found


def q4_k_m_grids(modules: dict[str, nn.Module]) -> dict[str, GridSpec]:
    """llama.cpp's Q4_K_M choice for each of ``modules`` (see the module docstring): Q4_K or
    Q6_K, the fallbacks Q5_0 / Q8_0 as integer grids, 16 (off) for F16.

    Raises:
        PPQConfigError: when a module's name is not a llama tensor the ``gguf`` name map knows
            (the rule counts attention-V and FFN-down layers by block).
    """
    names = gguf_names(list(modules))
    unknown = [n for n in modules if n not in names]
    if unknown:
        raise PPQConfigError(
            f"format='Q4_K_M' chooses Q4_K or Q6_K by llama tensor names; {unknown[0]!r} is "
            "not one the gguf name map knows. Use format 'Q4_K' with layer_bits instead."
        )
    blocks = {m.group(1) for g in names.values() if (m := re.match(r"blk\.(\d+)\.", g))}
    columns = {names[n]: weight_matrix(m).shape[1] for n, m in modules.items()}
    order = sorted(names, key=lambda n: _file_order(names[n]))
    types = q4_k_m_types([names[n] for n in order], max(len(blocks), 1), columns)
    grids = {}
    for name in modules:
        kind = types[names[name]]
        if kind in (None, "F16"):
            grids[name] = GridSpec(INT, OFF_BITS, None, False)
        else:
            grids[name] = GridSpec.of(kind)
    return grids


def _file_order(gguf_name: str) -> tuple[int, str]:
    """Tensors in the order a converter writes them: by block, then by name."""
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return (int(m.group(1)) if m else -1, gguf_name)


def assign_grids(
    modules: dict[str, nn.Module],
    stage: GridSpec,
    layer_bits: dict[str, Width] | None = None,
    promote: dict[str, Any] | None = None,
) -> dict[str, GridSpec]:
    """The grid of every module: ``layer_bits`` first, then ``promote``, else the stage's.

    Raises:
        PPQConfigError: when a ``layer_bits`` regex matches none of the modules (a typo would
            otherwise silently quantize everything on the stage's grid); bits other than 16 on
            a stage whose format is not ``int``; ``promote`` with the mixture ``Q4_K_M``.
    """
    chosen: dict[str, GridSpec] = {}
    for pattern, width in (layer_bits or {}).items():
        regex = re.compile(pattern)
        hits = [name for name in modules if regex.search(name) and name not in chosen]
        if not any(regex.search(name) for name in modules):
            raise PPQConfigError(
                f"layer_bits: {pattern!r} matches none of the {len(modules)} targeted layers "
                f"(e.g. {', '.join(list(modules)[:3])})."
            )
        grid = layer_grid(width, stage, f"layer_bits[{pattern!r}]")
        chosen.update({name: grid for name in hits})
    rest = {name: m for name, m in modules.items() if name not in chosen}
    if promote is not None and rest:
        if stage.format in MIXTURES:
            raise bad_value("promote", promote, f"None with format={stage.format!r}")
        promoted_grid = layer_grid(promote["bits"], stage, "promote.bits")
        numel = {name: weight_matrix(m).numel() for name, m in rest.items()}
        total = sum(weight_matrix(m).numel() for m in modules.values())
        ranked = sorted(rest, key=lambda n: -sensitivity(rest[n], stage))
        promoted = 0
        for name in ranked:
            if promoted >= promote["fraction"] * total:
                break
            chosen[name] = promoted_grid
            promoted += numel[name]
    rest = {name: m for name, m in modules.items() if name not in chosen}
    if stage.format == Q4_K_M and rest:
        chosen.update(q4_k_m_grids(rest))
    return {name: chosen.get(name, stage) for name in modules}


def assign_bits(
    modules: dict[str, nn.Module],
    bits: int,
    layer_bits: dict[str, Width] | None = None,
    promote: dict[str, Any] | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
) -> dict[str, int]:
    """The bit width of every module on an integer-grid stage (:func:`assign_grids`)."""
    stage = GridSpec.of(INT, bits, group_size, symmetric, allow_off=True)
    return {n: g.bits for n, g in assign_grids(modules, stage, layer_bits, promote).items()}


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig(StageConfig):
    """Bits or grid format per layer beside a method's uniform grid.

    Args:
        layer_bits: mixed precision by name, ``{regex: bits or format}`` (16 leaves matched
            layers unquantized; ``{"down_proj": "fp8"}`` gives them FP8).
        promote: mixed precision by sensitivity, ``{"bits": B, "fraction": f}``: the most
            sensitive layers holding a fraction ``f`` of the weights get ``B`` (bits or a
            format).

    Raises:
        PPQConfigError: see :func:`check_layer_bits` and :func:`check_promote`.
    """

    layer_bits: dict[str, int | str] | None = None
    promote: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_bits", check_layer_bits(self.layer_bits))
        object.__setattr__(self, "promote", check_promote(self.promote))
        stage = getattr(self, "grid", None)  # GridConfig's, when the method has one
        if isinstance(stage, GridSpec) and stage.format in MIXTURES and self.promote:
            raise bad_value("promote", self.promote, f"None with format={stage.format!r}")
        if isinstance(stage, GridSpec):
            values = dict((self.layer_bits or {}).items())
            if self.promote is not None:
                values["promote.bits"] = self.promote["bits"]
            for key, width in values.items():  # bits on a non-int stage: refused now
                argument = key if key == "promote.bits" else f"layer_bits[{key!r}]"
                layer_grid(width, stage, argument)
