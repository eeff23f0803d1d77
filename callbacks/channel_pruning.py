"""Structured pruning of MLP intermediate channels and attention heads, shrinking the layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ppq_lightning.calibration.config import CalibrationConfig
from ppq_lightning.calibration.engine import calibrate_sequentially
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.block_checkpoints import block_progress, check_block_checkpoints
from ppq_lightning.callbacks.calibrated import check_device, check_device_available
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.edits.channels import (
    STRUCTURES,
    apply_channel_edits,
    output_projections,
    plan_channel_edits,
)
from ppq_lightning.edits.loading import load_module_state
from ppq_lightning.errors import check_choice
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.channels import channel_importance
from ppq_lightning.ops.masks import check_sparsity


@dataclass(frozen=True, kw_only=True)
class ChannelPruningConfig(CalibrationConfig):
    """Channel pruning's arguments (see :class:`ChannelPruning`); its statistics are summed in
    float32 (``statistics_dtype`` is fixed).

    Raises:
        PPQConfigError: a ratio outside [0, 1), an unknown structure, bad calibration settings.
    """

    ratio: float
    structure: str = "mlp"
    num_calibration_batches: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.ratio, "ratio")
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("statistics_dtype", self.statistics_dtype, ("float32",))


class ChannelPruning(CompressionCallback):
    """Remove a ``ratio`` of the MLP intermediate channels and/or attention heads of every block,
    really shrinking the weights (the measured compression rate counts removed weights as 0
    bits).

    Importance of an intermediate channel ``j``: ``E[x_j^2] * ||W_out[:, j]||^2``, from the
    inputs of the output projection (``down_proj``/``fc2``/``c_proj``, or ``o_proj`` for heads)
    on calibration data, block by block. Heads are removed by key/value group (one KV head and
    its query heads) so grouped-query attention stays consistent. MLPs of Llama, Mistral,
    Qwen2, OPT and GPT-2 are recognised; heads of attention modules with
    ``q_proj/k_proj/v_proj/o_proj`` and ``head_dim`` (Llama, Mistral, Qwen2). Fires once, before
    the first evaluation or at fit start. Masks of earlier pruning are sliced with the weights;
    a per-channel quantization grid stays valid.

    Args:
        ratio: fraction of channels (or KV groups of heads) removed per block, in [0, 1).
        structure: ``"mlp"``, ``"heads"`` or ``"both"``.
        num_calibration_batches: calibration batches for the importance statistics.
        calibrate_on: ``"compressed"`` or ``"original"`` (see ``CalibratedCompression``).
        device: where each block runs during calibration; None keeps the placement.
        block_checkpoints: save each finished block (its shrunk layers) so a killed run
            continues from its last finished block (see ``CalibratedCompression``; the saved
            channel edits are replayed on load). Not part of the identity.
        **kwargs: ``targets`` (regexes restricting the output projections considered),
            ``ignore``, ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: bad ratio/structure/``device``, or at run time (before any weight
            changes) a ``device`` this machine lacks, a model with none of the known layouts, a
            layer of the pruned structure factorised by ``BasisSharing``, or a layer quantized
            with groups whose columns would be removed.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.ChannelPruning
              init_args: {ratio: 0.25, structure: mlp}
    """

    default_name = "channels"
    config_class = ChannelPruningConfig
    edits_structure = True
    streams_blocks = True  # the engine holds one block at a time
    kind = StageKind.PRUNE

    def __init__(
        self,
        ratio: float,
        structure: str = "mlp",
        num_calibration_batches: int = 32,
        calibrate_on: str = "compressed",
        device: str | None = None,
        block_checkpoints: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            ratio=ratio,
            structure=structure,
            num_calibration_batches=num_calibration_batches,
            calibrate_on=calibrate_on,
            **kwargs,
        )
        self.device = check_device(device)
        self.block_checkpoints = check_block_checkpoints(block_checkpoints)

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        check_device_available(self.device)
        outputs = output_projections(model, modules, self.structure)
        statistics = LayerStatistics("act_norm")
        entry = self.history_entry()
        metrics: dict[str, dict[str, float]] = {}

        def solve(layers: dict[str, nn.Module]) -> None:
            taken = statistics.take(list(layers))  # data-parallel: all ranks
            statistics.end_block()
            for name, layer in layers.items():
                parent, attribute = parent_of(model, name)
                scores = channel_importance(taken[name], weight_matrix(layer))  # (in,)
                edits = plan_channel_edits(parent, attribute, scores, self.ratio)
                apply_channel_edits(parent, edits, entry)
                kept = edits[-1].index
                metrics[name] = {
                    "kept_channels": float(kept.numel()),
                    "channels": float(scores.numel()),
                }

        batches = self.calibration_batches(self.num_calibration_batches)
        progress = block_progress(self, self.block_checkpoints, metrics, load_module_state)
        self.calibration_report = calibrate_sequentially(
            model,
            outputs,
            batches,
            statistics.observe,
            solve,
            self.calibrate_on,
            self.device,
            self.forward_fn,
            desc=self.name,
            progress=progress,
        )
        if progress is not None:
            progress.finish()
        return metrics
