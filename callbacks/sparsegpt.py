"""SparseGPT: one-shot pruning with second-order weight updates (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ppq_lightning.calibration.config import CalibrationConfig
from ppq_lightning.callbacks.calibrated import CalibratedCompression
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import (
    current_grid,
    current_mask,
    record_grid,
    record_mask,
    record_stage,
)
from ppq_lightning.modules.config import GridConfig, SparsityConfig
from ppq_lightning.modules.views import set_weight_matrix, weight_matrix
from ppq_lightning.ops.grid_formats import GRID_FORMATS, INT
from ppq_lightning.ops.grouped import grid_rows, solve_by_groups, take_rows
from ppq_lightning.ops.hessian import check_solver_args
from ppq_lightning.ops.masks import check_nm_width
from ppq_lightning.ops.sparsegpt import SparseGPTResult, sparsegpt


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CalibrationConfig, SparsityConfig, GridConfig):
    """SparseGPT's arguments (see :class:`SparseGPT`).

    Raises:
        PPQConfigError: bad sparsity or pattern, bits outside 2-8, a bad group size, block size
            or damping, ``symmetric`` not a bool, bad calibration settings.
    """

    bits: int | None = None
    block_size: int = 128
    damp: float = 0.01
    bits_optional: ClassVar[bool] = True
    formats: ClassVar[tuple[str, ...]] = GRID_FORMATS  # one grid per layer: no mixture

    def __post_init__(self) -> None:
        super().__post_init__()
        check_solver_args(self.block_size, self.damp)


class SparseGPT(CalibratedCompression):
    """Prune each layer by OBS saliency ``w^2 / [H^-1]_ii^2`` and update the surviving weights
    to compensate, block of columns by block of columns.

    Fires once, before the first evaluation or at fit start (block by block, like GPTQ). With
    ``bits`` it is SparseGPT's joint one-shot method: survivors are quantized in the same pass.
    On an already quantized layer (and without ``bits``) every updated survivor is put back on
    the recorded grid, so the quantization stays valid. Weights pruned by earlier stages stay
    pruned and count towards ``sparsity``.

    Args:
        sparsity: target fraction of zeros per layer, in [0, 1); optional for ``N:M``.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        bits: quantize the survivors jointly to this many bits (2-8); None to only prune.
        format: the joint mode's grid (``ops.grid_formats``; ``"int"`` by default). Another
            format (``"nvfp4"``, ``"fp8"``, ``"Q4_K"``, ...) implies its bits: its grid is
            computed from the dense weight before the walk, and survivors are rounded onto it.
        group_size, symmetric: grid settings for the joint mode.
        block_size: columns per block: the unstructured mask is chosen per block, as in the
            reference (so per-layer sparsity is exact when the width is a multiple of it).
        damp: damping as a fraction of the mean Hessian diagonal.
        **kwargs: ``num_calibration_batches``, ``calibrate_on``, ``device``,
            ``statistics_dtype`` (see ``CalibratedCompression``), ``targets``, ``ignore``,
            ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: bad sparsity/pattern/bits/group size/block size/damping, ``symmetric``
            not a bool, an unknown ``format`` or arguments it contradicts; before any weight
            changes, a layer whose grid cannot hold its shape, naming the layer (see also
            ``CalibratedCompression``).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.SparseGPT
              init_args: {sparsity: 0.5, pattern: unstructured, num_calibration_batches: 128}
    """

    default_name = "sparsegpt"
    config_class = SparseGPTConfig

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool | None = None,
        format: str = "int",
        block_size: int = 128,
        damp: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            sparsity=sparsity,
            pattern=pattern,
            bits=bits,
            format=format,
            group_size=group_size,
            symmetric=symmetric,
            block_size=block_size,
            damp=damp,
            **kwargs,
        )
        self.kind = StageKind.PRUNE if self.bits is None else StageKind.PRUNE_QUANTIZE

    def check_layers(self, modules: dict[str, nn.Module]) -> None:
        super().check_layers(modules)
        for name, module in modules.items():
            check_nm_width(self.config.nm, weight_matrix(module).shape[1], name)
            if self.config.grid is not None:
                self.config.grid.check_shape(tuple(weight_matrix(module).shape), name)

    def compress_layer(self, name: str, layer: nn.Module, statistic: Tensor) -> dict[str, float]:
        spec = self.config.grid
        if spec is None:  # only pruning: survivors of a quantized layer stay on its grid
            grid = current_grid(layer)
        elif spec.format != INT:  # joint mode on a fixed FP / K-quant grid of the dense weight
            grid = spec.compute(weight_matrix(layer).float())
        else:  # joint mode on an integer grid built during the walk
            grid = None
        keep = current_mask(layer)

        def solve(w: Tensor, h: Tensor, rows: slice) -> SparseGPTResult:
            return sparsegpt(
                w,
                h,
                sparsity=None if self.config.nm else self.sparsity,
                nm=self.config.nm,
                block_size=self.block_size,
                damp=self.damp,
                keep=take_rows(keep, rows),
                bits=self.bits if grid is None and spec is not None else None,
                group_size=self.group_size,
                symmetric=self.symmetric,
                grid=grid_rows(grid, rows),
            )

        result = solve_by_groups(
            solve, weight_matrix(layer).float(), statistic, self.grouped(layer)
        )
        set_weight_matrix(layer, result.weight)
        state = record_mask(layer, result.mask)
        if spec is not None:
            record_grid(layer, result.grid)
        record_stage(layer, self.history_entry())
        return {
            "sparsity": 1 - state.mask.float().mean().item(),
            "damp": result.damp,
            "damp_retries": result.retries,
            "obs_loss": result.loss,
        }
