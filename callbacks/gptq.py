"""GPTQ: quantization with second-order error feedback (Frantar et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ppq_lightning.calibration.config import CalibrationConfig
from ppq_lightning.callbacks.calibrated import CalibratedCompression
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import current_mask, record_grid, record_stage
from ppq_lightning.errors import check_bool
from ppq_lightning.modules.config import GridConfig
from ppq_lightning.modules.mixed_precision import MixedPrecisionConfig, assign_grids
from ppq_lightning.modules.views import set_weight_matrix, weight_matrix
from ppq_lightning.ops.gptq import GPTQResult, gptq
from ppq_lightning.ops.grid_formats import INT, GridSpec
from ppq_lightning.ops.grouped import grid_rows, solve_by_groups, take_rows
from ppq_lightning.ops.hessian import check_solver_args
from ppq_lightning.ops.quant_grid import OFF_BITS


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(CalibrationConfig, MixedPrecisionConfig, GridConfig):
    """GPTQ's arguments (see :class:`GPTQ`). ``block_size`` changes only the speed, yet stays
    in the identity: float32 sums in another order can round differently.

    Raises:
        PPQConfigError: bits outside 2-8, a bad group size, block size or damping,
            ``symmetric``/``act_order`` not a bool, bad mixed precision or calibration settings.
    """

    bits: int | None = None
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        check_bool("act_order", self.act_order)
        super().__post_init__()
        check_solver_args(self.block_size, self.damp)


class GPTQ(CalibratedCompression):
    """Quantize each layer column by column, spreading every rounding error over the columns not
    yet quantized through the inverse Hessian of the layer's calibration inputs.

    Fires once, before the first evaluation or at fit start, and walks the model block by block
    (see :class:`~ppq_lightning.callbacks.calibrated.CalibratedCompression`). On an already
    pruned layer it is GPTQ with a fixed mask: pruned weights quantize to exactly 0 and their
    error is propagated, so the sparsity is kept exactly. On an already quantized layer the new
    grid replaces the old one. When the Hessian is not positive definite the damping grows
    until its Cholesky factorisation succeeds; the damping used is logged per layer.

    Args:
        bits: bits per weight, 2 to 8 (implied by ``format`` for every format but ``int``).
        format: the grid, as in ``RTNQuantization``: ``"int"`` (default), ``"nvfp4"``,
            ``"mxfp4"``, ``"fp8"``, ``"fp8_block"``, ``"Q4_K"``, ``"Q5_K"``, ``"Q6_K"``,
            ``"Q4_K_M"``. The scales of every format but ``int`` are fixed from the layer's
            weight before the walk, which rounds each column to the format's levels.
        group_size: input columns sharing a scale/zero; None for one per output channel.
        symmetric: a grid centred on zero.
        act_order: quantize columns in order of decreasing Hessian diagonal (with groups, the
            groups' grids are fixed up front so they stay contiguous).
        block_size: columns per lazy-update block (speed only; the result is the same).
        damp: damping, as a fraction of the mean Hessian diagonal, added before inversion.
        layer_bits, promote: mixed precision by name (``{regex: bits}``) or by sensitivity
            (``{"bits": B, "fraction": f}``), as in ``RTNQuantization``.
        **kwargs: ``num_calibration_batches``, ``calibrate_on``, ``device``,
            ``statistics_dtype`` (see ``CalibratedCompression``), ``targets``, ``ignore``,
            ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: bits outside 2-8, a bad group size, block size or damping,
            ``symmetric``/``act_order`` not a bool, an unknown ``format`` or arguments it
            contradicts, bad ``layer_bits``/``promote``; before any weight changes, a layer
            whose grid cannot hold its shape, naming the layer and the fix (see also
            ``CalibratedCompression``).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.GPTQ
              init_args: {bits: 4, group_size: 128, act_order: true, num_calibration_batches: 128}
            - class_path: ppq_lightning.callbacks.GPTQ   # the codes of a GGUF Q4_K_M file
              init_args: {format: Q4_K_M, num_calibration_batches: 128}
    """

    default_name = "gptq"
    kind = StageKind.QUANTIZE
    config_class = GPTQConfig

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool | None = None,
        format: str = "int",
        act_order: bool = False,
        block_size: int = 128,
        damp: float = 0.01,
        layer_bits: dict[str, int | str] | None = None,
        promote: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            bits=bits,
            format=format,
            group_size=group_size,
            symmetric=symmetric,
            act_order=act_order,
            block_size=block_size,
            damp=damp,
            layer_bits=layer_bits,
            promote=promote,
            **kwargs,
        )
        self._grids: dict[str, GridSpec] = {}

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        self._grids = assign_grids(modules, self.config.grid, self.layer_bits, self.promote)
        for name, module in modules.items():  # check every layer before touching any
            if not self._grids[name].off:
                self._grids[name].check_shape(tuple(weight_matrix(module).shape), name)
        return super().compress(model, modules)

    def compress_layer(self, name: str, layer: nn.Module, statistic: Tensor) -> dict[str, float]:
        spec = self._grids.get(name, self.config.grid)
        if spec.off:  # left unquantized by layer_bits
            return {"bits": float(OFF_BITS)}
        mask = current_mask(layer)
        w = weight_matrix(layer).float()
        # an FP / K-quant grid's scales are fixed before the walk, from the current weight
        fixed = None if spec.format == INT else spec.compute(w)

        def solve(w: Tensor, h: Tensor, rows: slice) -> GPTQResult:
            return gptq(
                w,
                h,
                spec.bits,
                spec.group_size,
                spec.symmetric,
                self.act_order,
                self.block_size,
                self.damp,
                mask=take_rows(mask, rows),
                grid=grid_rows(fixed, rows),
            )

        result = solve_by_groups(solve, w, statistic, self.grouped(layer))
        set_weight_matrix(layer, result.weight)
        record_grid(layer, fixed if fixed is not None else result.grid)
        record_stage(layer, self.history_entry())
        return {
            "bits": float(spec.bits),
            "damp": result.damp,
            "damp_retries": result.retries,
            "obs_loss": result.loss,
        }
