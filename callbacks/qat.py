"""Quantization-aware training: train through a fake-quantized forward, end on the grid."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from ppq_lightning.callbacks.fake_quant_stage import FakeQuantStage
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.edits.training import finalise_qat
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.config import GridConfig
from ppq_lightning.modules.transforms import WeightTransform
from ppq_lightning.modules.views import as_matrix, to_weight_layout, weight_matrix
from ppq_lightning.ops.grid_formats import INT
from ppq_lightning.ops.quant_grid import check_group_size, compute_grid
from ppq_lightning.ops.ste import fake_quantize_ste


def qat_weight(
    module: nn.Module, bits: int, group_size: int | None, symmetric: bool, weight: Tensor
) -> Tensor:
    """The weight QAT's forward uses: ``weight`` rounded onto the min-max grid of its current
    values (straight-through gradient), in the layout of ``module.weight``."""
    w = as_matrix(module, weight)  # (out, in)
    grid = compute_grid(w, bits, group_size, symmetric)  # from the detached latent weights
    return to_weight_layout(module, fake_quantize_ste(w, grid))


@dataclass(frozen=True, kw_only=True)
class QATConfig(GridConfig):
    """Quantization-aware training's arguments (see :class:`QuantizationAwareTraining`).

    Raises:
        PPQConfigError: bits outside 2-8, a bad group size, ``symmetric`` not a bool.
    """

    bits: int
    formats: ClassVar[tuple[str, ...]] = (INT,)  # the latent weight's min-max integer grid


class QuantizationAwareTraining(FakeQuantStage):
    """Quantization-aware training (QAT) with a straight-through estimator, in ``fit``.

    From ``setup`` of ``fit`` on, every target layer computes with ``fake_quantize(W)``: its
    latent full-precision weight ``W`` rounded onto a min-max grid (per output channel or per
    group, as :class:`~ppq_lightning.callbacks.RTNQuantization` builds it); the gradient passes
    the rounding unchanged (STE) and updates ``W``. The grid is recomputed from the current
    ``W`` at every forward, so it follows the weights as they move, no weight is ever clipped
    (its gradient would vanish), and the forward of the last step is exactly the model that is
    written at the end. Weights pruned by earlier stages stay 0: their gradients are zeroed and
    the mask is re-applied after every optimizer step, and 0 is a point of every grid.

    When training ends each layer's weight becomes ``fake_quantize(W)`` on the grid of the final
    ``W``; that grid is recorded (replacing an earlier one) with the stage in the history.
    Stages listed after this one in the Trainer fire then. Per-layer metrics: ``bits`` and
    ``weight_error`` (``||Q(W) - W||^2 / ||W||^2`` against the final latent weights).

    Args:
        bits: bits per weight, 2 to 8.
        group_size: consecutive input weights sharing one scale/zero; None for one per output
            channel. Must divide every targeted layer's input dimension.
        symmetric: a grid centred on zero (no stored zero point) instead of min-max.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: bits outside 2-8, a group size that is not a positive integer,
            ``symmetric`` not a bool; at
            ``setup``, a group size that does not divide a layer's input dimension (checked for
            every layer before any is touched), a layer already trained by another stage, or
            a model whose parameters are all frozen (nothing to train); use outside ``fit``
            (the stage trains).

    Example (YAML)::

        trainer:
          max_steps: 1000
          callbacks:
            - class_path: ppq_lightning.callbacks.MagnitudePruning
              init_args: {sparsity: 0.5}
            - class_path: ppq_lightning.callbacks.QuantizationAwareTraining
              init_args: {bits: 4, group_size: 32}
    """

    default_name = "qat"
    config_class = QATConfig
    kind = StageKind.QUANTIZE
    completion = "qat"

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        symmetric: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(bits=bits, group_size=group_size, symmetric=symmetric, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a model with nothing to train, then set the stage up (see the base class).

        Raises:
            PPQConfigError: in ``fit``, when no parameter of the model requires a gradient (the
                backward failed with ``element 0 of tensors does not require grad``).
        """
        fitting = stage == TrainerFn.FITTING and not self.already_applied(pl_module)
        if fitting and not any(p.requires_grad for p in pl_module.parameters()):
            raise PPQConfigError(
                f"{self.name}: every parameter of {type(pl_module).__name__} is frozen "
                "(requires_grad=False): quantization-aware training has nothing to train. "
                "Unfreeze the weights it quantizes (requires_grad_(True)), or quantize "
                "without training (RTNQuantization, GPTQ) in validate."
            )
        super().setup(trainer, pl_module, stage)

    def check_layer(self, name: str, module: nn.Module) -> None:
        check_group_size(self.group_size, weight_matrix(module).shape[1], f"group_size ({name})")

    def prepare(self, name: str, module: nn.Module) -> WeightTransform:
        return partial(qat_weight, module, self.bits, self.group_size, self.symmetric)

    def finalise(self, name: str, module: nn.Module) -> dict[str, float]:
        return finalise_qat(module, self.history_entry())
