"""Round-to-nearest (RTN) weight quantization onto a min-max grid."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import record_grid, record_stage
from ppq_lightning.modules.config import GridConfig
from ppq_lightning.modules.mixed_precision import MixedPrecisionConfig, assign_grids
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.quant_grid import OFF_BITS

CURVE_BITS = (8, 6, 5, 4, 3, 2)  # the default quantization-only curve of an order study


@dataclass(frozen=True, kw_only=True)
class RTNConfig(MixedPrecisionConfig, GridConfig):
    """RTN's arguments (see :class:`RTNQuantization`).

    Raises:
        PPQConfigError: bits outside 2-8 (and not 16), a bad format or group size,
            ``symmetric`` not a bool, arguments the format contradicts, bad
            ``layer_bits``/``promote``.
    """

    bits: int | None = None
    bits_off: ClassVar[bool] = True


class RTNQuantization(CompressionCallback):
    """Quantize each weight to the nearest point of a grid: a per-channel or per-group min-max
    integer grid, or a format runtimes ship (NVFP4, MXFP4, FP8, GGUF K-quants).

    Fires once, before the first evaluation (``validate``/``test``) or at the start of ``fit``.
    The grid of every row/group includes 0, so weights pruned by earlier stages stay exactly
    zero. On an already quantized layer the weights are re-quantized and the new grid replaces
    the old one in the recorded state.

    Args:
        bits: bits per weight, 2 to 8; 16 turns the stage off (weights untouched, nothing
            recorded), so that sweeps can include the unquantized point. Implied by ``format``
            for every format but ``int``.
        format: the grid (``ops.grid_formats``): ``"int"`` (default), ``"nvfp4"``,
            ``"mxfp4"``, ``"fp8"``, ``"fp8_block"``, ``"Q4_K"``, ``"Q5_K"``, ``"Q6_K"``, or
            ``"Q4_K_M"`` (llama.cpp's per-layer mixture of Q4_K and Q6_K).
        group_size: consecutive input weights sharing one scale/zero; None for one per output
            channel. Must divide every targeted layer's input dimension.
        symmetric: a grid centred on zero (no stored zero point) instead of min-max (None: the
            format's own; False for ``int``).
        layer_bits: mixed precision by name, ``{regex: bits or format}`` (16 leaves matched
            layers unquantized; with ``bits=16`` only the matched layers are quantized).
        promote: mixed precision by sensitivity, ``{"bits": B, "fraction": f}``: the most
            sensitive layers (largest relative RTN error at ``bits``) holding a fraction ``f``
            of the weights get ``B`` bits (``ppq_lightning.modules.mixed_precision``).
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: bits outside 2-8 (and not 16), a group size that is not a positive
            integer, ``symmetric`` not a bool, an unknown ``format`` or a bits, group size or
            symmetry it contradicts, bad ``layer_bits``/``promote``; at run time, before any
            weight changes, a layer whose grid cannot hold its shape (a group size that does
            not divide its input dimension, columns not a multiple of 16/32/256 for
            NVFP4/MXFP4/K-quants), naming the layer and the fix.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.RTNQuantization
              init_args: {bits: 4, group_size: 128, symmetric: false}
            - class_path: ppq_lightning.callbacks.RTNQuantization   # NVFP4, down_proj in FP8
              init_args: {format: nvfp4, layer_bits: {"mlp\\.down_proj": fp8}}
            - class_path: ppq_lightning.callbacks.RTNQuantization   # 3 bits, down_proj at 8,
              init_args:                                            # the 10% most sensitive at 6
                bits: 3
                layer_bits: {"mlp\\.down_proj": 8}
                promote: {bits: 6, fraction: 0.1}
    """

    default_name = "rtn"
    kind = StageKind.QUANTIZE
    config_class = RTNConfig

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool | None = None,
        format: str = "int",
        layer_bits: dict[str, int | str] | None = None,
        promote: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            bits=bits,
            format=format,
            group_size=group_size,
            symmetric=symmetric,
            layer_bits=layer_bits,
            promote=promote,
            **kwargs,
        )

    @classmethod
    def curve(cls, bits: Iterable[int] = CURVE_BITS, **kwargs: Any) -> list[RTNQuantization]:
        """Per-channel asymmetric RTN at each bit width, named ``RTN<bits>``: the
        quantization-only curve an order study interpolates ``C*`` on (``kwargs``: more
        arguments of every stage, e.g. ``b_orig=32``)."""
        return [cls(bits=b, name=f"RTN{b}", log_layers=False, **kwargs) for b in bits]

    @property
    def layerwise(self) -> bool:
        """Each layer is rounded on its own, unless ``layer_bits`` or ``promote`` choose widths
        across layers."""
        return self.layer_bits is None and self.promote is None

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        if self.bits == OFF_BITS and self.layer_bits is None:
            return {}
        grids = assign_grids(modules, self.config.grid, self.layer_bits, self.promote)
        for name, module in modules.items():  # check every layer before touching any
            if not grids[name].off:
                grids[name].check_shape(tuple(weight_matrix(module).shape), name)
        entry = self.history_entry()
        layers = {}
        for name, module in modules.items():
            if grids[name].off:
                continue
            with torch.no_grad():  # (out, in * kernel), rounded in place by row slices
                grid, error = grids[name].round_(weight_matrix(module))
            record_grid(module, grid)
            record_stage(module, entry)
            layers[name] = {"bits": float(grids[name].bits), "weight_error": error}
        return layers
