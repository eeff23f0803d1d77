"""Wanda: pruning by weight magnitude times input activation norm (Sun et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ppq_lightning.calibration.config import CalibrationConfig
from ppq_lightning.callbacks.calibrated import CalibratedCompression
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import current_mask, record_mask, record_stage
from ppq_lightning.errors import check_choice
from ppq_lightning.modules.config import SparsityConfig
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.grouped import solve_by_groups, take_rows
from ppq_lightning.ops.masks import check_nm_width
from ppq_lightning.ops.wanda import WANDA_SCOPES, wanda_mask


@dataclass(frozen=True, kw_only=True)
class WandaConfig(CalibrationConfig, SparsityConfig):
    """Wanda's arguments (see :class:`Wanda`).

    Raises:
        PPQConfigError: bad sparsity, pattern, scope or calibration settings.
    """

    scope: str = "row"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scope", self.scope, WANDA_SCOPES)


class Wanda(CalibratedCompression):
    """Prune the weights with the smallest ``|W_ij| * ||X_j||`` in each output row, layer or
    N:M group, with no weight update.

    Fires once, before the first evaluation or at fit start, block by block. Survivors are not
    changed, so on a quantized layer they stay on the recorded grid; weights pruned before stay
    pruned and count towards ``sparsity``.

    Args:
        sparsity: target fraction of zeros per output row, in [0, 1); optional for ``N:M``.
        pattern: ``"unstructured"`` or ``"N:M"``.
        scope: the comparison group of unstructured pruning: ``"row"`` (each output row
            reaches ``sparsity``, as the paper does for LLMs) or ``"layer"`` (one threshold per
            layer; per group of a grouped convolution). Wanda's reference code offers both for
            image classifiers (``--prune_granularity``).
        **kwargs: ``num_calibration_batches``, ``calibrate_on``, ``device``,
            ``statistics_dtype`` (see ``CalibratedCompression``), ``targets``, ``ignore``,
            ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: bad sparsity, pattern or scope.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.Wanda
              init_args: {sparsity: 0.5, num_calibration_batches: 128}
            - class_path: ppq_lightning.callbacks.Wanda  # an image classifier
              init_args: {sparsity: 0.5, scope: layer, name: wanda_layer}
    """

    default_name = "wanda"
    kind = StageKind.PRUNE
    statistic: ClassVar[str] = "act_norm"
    config_class = WandaConfig

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        scope: str = "row",
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity=sparsity, pattern=pattern, scope=scope, **kwargs)

    def check_layers(self, modules: dict[str, nn.Module]) -> None:
        super().check_layers(modules)
        for name, module in modules.items():
            check_nm_width(self.config.nm, weight_matrix(module).shape[1], name)

    def compress_layer(self, name: str, layer: nn.Module, statistic: Tensor) -> dict[str, float]:
        keep = current_mask(layer)

        def solve(w: Tensor, norms: Tensor, rows: slice) -> Tensor:
            sparsity = None if self.config.nm else self.sparsity
            keep_rows = take_rows(keep, rows)
            return wanda_mask(w, norms, sparsity, self.config.nm, keep_rows, scope=self.scope)

        # the weight in its own dtype: the scores are made in float32 a slice of rows at a time
        mask = solve_by_groups(solve, weight_matrix(layer).detach(), statistic, self.grouped(layer))
        state = record_mask(layer, mask)
        record_stage(layer, self.history_entry())
        return {"sparsity": 1 - int(state.mask.count_nonzero()) / state.mask.numel()}
