"""BatchNorm stages for vision models: re-estimate the running statistics after compression,
or fold BatchNorm into the convolutions before quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ppq_lightning.calibration.batchnorm import batchnorm_layers, recalibrate_batchnorm
from ppq_lightning.calibration.data import check_num_batches
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import record_stage
from ppq_lightning.edits.batchnorm import check_foldable, conv_batchnorm_pairs, fold_pair
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.targets import compile_patterns


@dataclass(frozen=True, kw_only=True)
class RecalibrationConfig(StageConfig):
    """BatchNorm recalibration's arguments (see :class:`BatchNormRecalibration`).

    Raises:
        PPQConfigError: a bad ``num_calibration_batches`` or ``layers`` regex.
    """

    num_calibration_batches: int = 32
    layers: str | list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_batches(self.num_calibration_batches)
        compile_patterns(self.layers, "layers")


class BatchNormRecalibration(CompressionCallback):
    """Reset the BatchNorm running statistics and re-estimate them on calibration batches.

    Compression moves a network's activations away from the means and variances its
    BatchNorm layers learned on the dense model; recomputing them (the exact average over the
    batches, every other module in eval mode) recovers much of the lost accuracy, as OBC's
    post-processing and NNCF's BatchNorm adaptation do. No weight changes, so every recorded
    mask and grid stays valid: usable after any stage (``P>Q>B``, ``P>B>Q``). Fires once, like
    every stage; the per-layer ``mean_shift`` and ``var_ratio`` say how far the statistics
    moved.

    Args:
        num_calibration_batches: batches to average over (training data works as well).
        layers: regexes of the BatchNorm layers to recalibrate (None: all of them).
        **kwargs: ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: a bad ``num_calibration_batches`` or ``layers``; at run time a model
            without BatchNorm, regexes matching none of its BatchNorm layers, or no data.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.MagnitudePruning
              init_args: {name: P, sparsity: 0.5}
            - class_path: ppq_lightning.callbacks.BatchNormRecalibration
              init_args: {name: B, num_calibration_batches: 16}
    """

    default_name = "bn"
    config_class = RecalibrationConfig
    kind = StageKind.NORMALIZATION

    def __init__(
        self,
        num_calibration_batches: int = 32,
        layers: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_calibration_batches=num_calibration_batches, layers=layers, **kwargs)

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        chosen = batchnorm_layers(model)
        patterns = compile_patterns(self.layers, "layers")
        if patterns:
            chosen = {n: m for n, m in chosen.items() if any(p.search(n) for p in patterns)}
            if not chosen:
                raise PPQConfigError(
                    f"layers={self.layers!r} matched none of the BatchNorm layers "
                    f"(e.g. {', '.join(list(batchnorm_layers(model))[:3]) or 'none'})."
                )
        batches = self.calibration_batches(self.num_calibration_batches)
        metrics = recalibrate_batchnorm(model, batches, self.model_forward, chosen or None)
        entry = self.history_entry()
        for name in metrics:
            record_stage(model.get_submodule(name), entry)
        return metrics


class FoldBatchNorm(CompressionCallback):
    """Fold every BatchNorm that directly follows a convolution into it (in eval mode the same
    function: weight ``W gamma / sigma`` per output channel, a bias), before quantization.

    Which choice a study makes is recorded: folded layers carry the stage (``kind`` ``N``) and
    the BatchNorm each absorbed, and the BatchNorm is replaced (by ``nn.Identity``; timm's
    ``BatchNormAct2d`` by its activation), an edit that a checkpoint replays on load. Pruned
    zeros stay zeros (each row is scaled); a convolution already quantized is refused (fold
    first: ``F>P>Q``). The pairs are found from one forward pass of a calibration batch.

    Args:
        **kwargs: ``targets``, ``ignore`` (which convolutions may absorb their BatchNorm;
            by default every one, the stem and classifier included: folding loses nothing),
            ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: at run time, no convolution followed by BatchNorm, a quantized one, or
            no calibration data.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.FoldBatchNorm
              init_args: {name: F}
            - class_path: ppq_lightning.callbacks.GPTQ
              init_args: {name: Q, bits: 4}
    """

    runs_model = True  # traces the model on one calibration batch

    default_name = "fold"
    kind = StageKind.NORMALIZATION

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        batch = self.calibration_batches(1)[0]
        convs = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
        if self.targets is not None or self.ignore is not None:
            convs &= set(modules)
        pairs = [
            (c, b) for c, b in conv_batchnorm_pairs(model, batch, self.model_forward) if c in convs
        ]
        if not pairs:
            raise PPQConfigError(
                "FoldBatchNorm found no convolution followed directly by BatchNorm among the "
                f"targets={self.targets!r} (ignore={self.ignore!r})."
            )
        entry = self.history_entry()
        for conv, _ in pairs:  # check every conv before touching any
            check_foldable(model, conv)
        for conv, bn in pairs:
            fold_pair(model, conv, bn, entry)
        return {conv: {"folded": 1.0} for conv, _ in pairs}
