"""Mixed precision: which bit width each layer of a quantization stage gets.

Two rules, applied in this order by :func:`assign_bits`:

1. ``layer_bits``: ``{regex: bits}``; a layer whose name matches a regex (``re.search``, first
   match in the mapping's order) gets those bits.
2. ``promote``: ``{"bits": B, "fraction": f}``; of the remaining layers, the most sensitive ones
   (by the data-free sensitivity: relative error ``||W - Q(W)||^2 / ||W||^2`` of the stage's own
   round-to-nearest grid) get ``B`` bits, until they hold at least ``f`` of the stage's weights.

Every other layer gets the stage's ``bits``. The measured average bits and C of the result are
reported by ``compression_summary`` (each layer's recorded grid counts at its own width).
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
from ppq_lightning.ops.quant_grid import check_bits, compute_grid
from ppq_lightning.ops.reconstruction import relative_weight_error


def check_layer_bits(layer_bits: dict[str, int] | None) -> dict[str, int] | None:
    """Validate ``{regex: bits}`` (16 leaves the matched layers unquantized).

    Raises:
        PPQConfigError: on a non-mapping, an invalid regex or bits outside 2-8.
    """
    if layer_bits is None:
        return None
    if not isinstance(layer_bits, dict) or not layer_bits:
        raise bad_value("layer_bits", layer_bits, "a non-empty mapping {regex: bits}")
    compile_patterns(list(layer_bits), "layer_bits")
    for pattern, bits in layer_bits.items():
        check_bits(bits, f"layer_bits[{pattern!r}]", allow_off=True)
    return dict(layer_bits)


def check_promote(promote: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``{"bits": B, "fraction": f}`` with ``0 < f <= 1``.

    Raises:
        PPQConfigError: on other keys, bits outside 2-8 or a fraction outside (0, 1].
    """
    if promote is None:
        return None
    if not isinstance(promote, dict) or set(promote) != {"bits", "fraction"}:
        raise bad_value("promote", promote, 'a mapping {"bits": B, "fraction": f}')
    check_bits(promote["bits"], "promote.bits")
    fraction = check_number("promote.fraction", promote["fraction"], 0, 1, low_open=True)
    return {"bits": promote["bits"], "fraction": float(fraction)}


def sensitivity(module: nn.Module, bits: int, group_size: int | None, symmetric: bool) -> float:
    """Relative round-to-nearest error ``||W - Q(W)||^2 / ||W||^2`` of ``module`` at ``bits``."""
    w = weight_matrix(module).float()
    q = compute_grid(w, bits, group_size, symmetric).fake_quantize(w)
    return relative_weight_error(w, q)


def assign_bits(
    modules: dict[str, nn.Module],
    bits: int,
    layer_bits: dict[str, int] | None = None,
    promote: dict[str, Any] | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
) -> dict[str, int]:
    """The bit width of every module: ``layer_bits`` first, then ``promote``, else ``bits``.

    Raises:
        PPQConfigError: when a ``layer_bits`` regex matches none of the modules (a typo would
            otherwise silently quantize everything at ``bits``).
    """
    chosen: dict[str, int] = {}
    for pattern, width in (layer_bits or {}).items():
        regex = re.compile(pattern)
        hits = [name for name in modules if regex.search(name) and name not in chosen]
        if not any(regex.search(name) for name in modules):
            raise PPQConfigError(
                f"layer_bits: {pattern!r} matches none of the {len(modules)} targeted layers "
                f"(e.g. {', '.join(list(modules)[:3])})."
            )
        chosen.update({name: width for name in hits})
    rest = [name for name in modules if name not in chosen]
    if promote is not None and rest:
        numel = {name: weight_matrix(modules[name]).numel() for name in rest}
        total = sum(weight_matrix(m).numel() for m in modules.values())
        ranked = sorted(rest, key=lambda n: -sensitivity(modules[n], bits, group_size, symmetric))
        promoted = 0
        for name in ranked:
            if promoted >= promote["fraction"] * total:
                break
            chosen[name] = promote["bits"]
            promoted += numel[name]
    return {name: chosen.get(name, bits) for name in modules}


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig(StageConfig):
    """Bits per layer beside a method's uniform ``bits``.

    Args:
        layer_bits: mixed precision by name, ``{regex: bits}`` (16 leaves matched layers
            unquantized).
        promote: mixed precision by sensitivity, ``{"bits": B, "fraction": f}``: the most
            sensitive layers holding a fraction ``f`` of the weights get ``B`` bits.

    Raises:
        PPQConfigError: see :func:`check_layer_bits` and :func:`check_promote`.
    """

    layer_bits: dict[str, int] | None = None
    promote: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_bits", check_layer_bits(self.layer_bits))
        object.__setattr__(self, "promote", check_promote(self.promote))
