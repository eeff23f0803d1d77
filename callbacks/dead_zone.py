"""CoDeQ: joint pruning and quantization with a learned dead-zone quantizer, in ``fit``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
from torch import Tensor, nn

from ppq_lightning.callbacks.fake_quant_stage import FakeQuantStage, add_gradients
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.edits.training import (
    QUANTIZER_NAME,
    attach_dead_zone_quantizer,
    finalise_dead_zone,
    remove_child,
)
from ppq_lightning.errors import bad_value, check_bool, check_number
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.transforms import WeightTransform
from ppq_lightning.modules.views import as_matrix, to_weight_layout
from ppq_lightning.ops.quant_grid import MAX_BITS, MIN_BITS, check_bits


def codeq_weight(module: nn.Module, weight: Tensor) -> Tensor:
    """The weight CoDeQ's forward uses: ``q(weight)`` of the layer's dead-zone quantizer, in
    the layout and dtype of ``module.weight``."""
    quantizer = module.get_submodule(QUANTIZER_NAME)
    return to_weight_layout(module, quantizer(as_matrix(module, weight)).to(weight.dtype))


@dataclass(frozen=True, kw_only=True)
class DeadZoneConfig(StageConfig):
    """CoDeQ's arguments (see :class:`DeadZoneQuantization`).

    Raises:
        PPQConfigError: see :class:`DeadZoneQuantization`.
    """

    bits: int = 4
    learn_bits: bool = False
    sparsity_weight: float = 0.0
    bits_weight: float = 0.0
    init_dead_zone: float | None = None
    temperature: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        check_bool("learn_bits", self.learn_bits)
        check_number("sparsity_weight", self.sparsity_weight, low=0)
        check_number("bits_weight", self.bits_weight, low=0)
        if self.bits_weight > 0 and not self.learn_bits:
            raise bad_value("bits_weight", self.bits_weight, "0 unless learn_bits=True")
        check_number("init_dead_zone", self.init_dead_zone, 0, 1, high_open=True, allow_none=True)
        check_number("temperature", self.temperature, low=0, low_open=True)


class DeadZoneQuantization(FakeQuantStage):
    """CoDeQ: learn per layer how much to prune (a dead zone) and, optionally, how many bits.

    Every target layer computes with ``q(W)`` of a symmetric per-channel dead-zone quantizer
    (``ppq_lightning.ops.dead_zone``): per output row, step ``s = max|w| / (2**(b-1) - 1)`` and
    dead zone ``d = sigmoid(theta) * max|w|``; ``q(w) = 0`` for ``|w| <= d``, else
    ``s * round(w / s)``. Weights inside the dead zone are exactly zero: magnitude pruning
    inside the quantizer. ``theta`` (one per layer, i.e. one dead-zone fraction per layer) is
    learned by backpropagation: rounding uses a straight-through gradient, and the hard gate
    ``1[|w| > d]`` is differentiated as ``sigmoid((|w| - d) / (temperature * max|w|))``. With
    ``learn_bits`` a continuous bit width per layer, clamped to [2, 8] and rounded (STE), is
    learned too. The step and ``max|w|`` are recomputed from the latent weights every forward.

    A callback cannot change the model's loss, so the regulariser is added to the gradients in
    ``on_after_backward``: ``sparsity_weight * keep + bits_weight * avg_bits``, where ``keep``
    is the soft fraction of kept weights and ``avg_bits`` the continuous bit width, both
    averaged over all target weights (layers weighted by size). It acts on ``theta`` and the
    bit widths only. Logged every step: ``codeq/regulariser``, ``codeq/sparsity`` (measured)
    and ``codeq/avg_bits`` (``codeq`` is the stage's ``name`` when given).

    The parameters live in a child ``ppq_dead_zone`` of each target layer, created at ``setup``
    so that the optimizer trains them and checkpoints save them (a resumed run continues
    exactly). When training ends the weight becomes ``q(W)``, the grid (symmetric, per channel,
    the learned bits) and the mask ``q(W) != 0`` (combined with any earlier mask) are recorded,
    and the children are removed. Per-layer metrics: ``sparsity``, ``bits``, ``dead_zone``
    (``d / max|w|``) and ``weight_error`` (``||q(W) - W||^2 / ||W||^2``).

    Args:
        bits: bit width, 2 to 8 (the initial one when ``learn_bits``).
        learn_bits: learn a bit width per layer.
        sparsity_weight: weight of the sparsity regulariser (lambda), >= 0; larger prunes more.
        bits_weight: weight of the average-bits regulariser, >= 0; needs ``learn_bits``.
        init_dead_zone: initial ``d / max|w|``, in [0, 1) (0 starts at 1e-4); None starts at
            half a step, where the quantizer equals plain symmetric rounding.
        temperature: width of the soft gate that gives ``theta`` its gradient, in units of
            ``max|w|`` of the row, > 0.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: bits outside 2-8, ``learn_bits`` not a bool, a negative or non-numeric
            ``sparsity_weight``/``bits_weight``, ``bits_weight > 0`` without ``learn_bits``,
            ``init_dead_zone`` outside [0, 1), ``temperature <= 0``; at ``setup``, a layer
            already trained by another stage; use outside ``fit`` (the stage trains).

    Example (YAML)::

        trainer:
          max_steps: 2000
          callbacks:
            - class_path: ppq_lightning.callbacks.DeadZoneQuantization
              init_args: {bits: 4, sparsity_weight: 1.0, learn_bits: true, bits_weight: 0.05}
    """

    default_name = "codeq"
    config_class = DeadZoneConfig
    kind = StageKind.PRUNE_QUANTIZE
    completion = "dead_zone"

    def __init__(
        self,
        bits: int = 4,
        learn_bits: bool = False,
        sparsity_weight: float = 0.0,
        bits_weight: float = 0.0,
        init_dead_zone: float | None = None,
        temperature: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            bits=bits,
            learn_bits=learn_bits,
            sparsity_weight=sparsity_weight,
            bits_weight=bits_weight,
            init_dead_zone=init_dead_zone,
            temperature=temperature,
            **kwargs,
        )

    # -- setup and the end ------------------------------------------------------------------
    def prepare(self, name: str, module: nn.Module) -> WeightTransform:
        attach_dead_zone_quantizer(
            module, self.bits, self.init_dead_zone, self.temperature, self.learn_bits
        )
        return partial(codeq_weight, module)

    def remove_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return remove_child(module, QUANTIZER_NAME)

    def after_step(self) -> None:
        for module in self._layers.values():
            module.get_submodule(QUANTIZER_NAME).project()

    def finalise(self, name: str, module: nn.Module) -> dict[str, float]:
        return finalise_dead_zone(module, self.history_entry())

    # -- the regulariser, added to the gradients after every backward ------------------------
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._layers:
            return
        total = sum(module.weight.numel() for module in self._layers.values())
        keep, kept, avg_bits, soft_bits = 0.0, 0.0, 0.0, 0.0
        parameters: list[nn.Parameter] = []
        for module in self._layers.values():
            quantizer = module.get_submodule(QUANTIZER_NAME)
            share = module.weight.numel() / total
            soft, hard = quantizer.keep_rates(as_matrix(module, module.weight))
            keep, kept = keep + share * soft, kept + share * hard
            avg_bits += share * quantizer.integer_bits()
            if quantizer.bit_width is not None:
                soft_bits = soft_bits + share * quantizer.bit_width.clamp(MIN_BITS, MAX_BITS)
            parameters += list(quantizer.parameters())
        regulariser = self.sparsity_weight * keep + self.bits_weight * soft_bits
        if (self.sparsity_weight > 0 or self.bits_weight > 0) and regulariser.requires_grad:
            add_gradients(trainer, regulariser, parameters)
        pl_module.log_dict(
            {
                f"{self.name}/regulariser": float(regulariser.detach()),
                f"{self.name}/sparsity": 1 - float(kept),
                f"{self.name}/avg_bits": float(avg_bits),
            },
            on_step=True,
            on_epoch=False,
        )
