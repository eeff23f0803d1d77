"""SQS: pruning and quantization at once by variational learning, in ``fit``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ppq_lightning.callbacks.fake_quant_stage import FakeQuantStage, add_gradients
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import current_mask
from ppq_lightning.edits.training import (
    POSTERIOR_NAME,
    attach_sqs_posterior,
    finalise_sqs,
    remove_child,
)
from ppq_lightning.errors import bad_value, check_int, check_number
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.transforms import WeightTransform
from ppq_lightning.modules.views import as_matrix, to_weight_layout
from ppq_lightning.ops.quant_grid import check_bits
from ppq_lightning.ops.sqs import SQSPosterior


def sqs_weight(module: nn.Module, stage: SQS, weight: Tensor) -> Tensor:
    """The weight the layer computes with: a posterior sample in a forward that records
    gradients (training), the collapsed weights otherwise (validation: what the stage will
    leave), in the layout and dtype of ``weight``. (Not ``module.training``: Hugging Face
    models are loaded in eval mode and Lightning keeps that mode in ``fit``.)"""
    posterior: SQSPosterior = module.get_submodule(POSTERIOR_NAME)
    w = as_matrix(module, weight)
    mask = current_mask(module)
    if torch.is_grad_enabled():
        generator = stage.generator(posterior, w.device)
        out = posterior.sample(w, stage.temperature_at(int(posterior.step)), generator)
    else:
        out = posterior.collapse(w)[0]
    if mask is not None:
        out = out * mask.to(out.device)
    return to_weight_layout(module, out.to(weight.dtype))


@dataclass(frozen=True, kw_only=True)
class SQSConfig(StageConfig):
    """SQS's arguments (see :class:`SQS`).

    Raises:
        PPQConfigError: see :class:`SQS`.
    """

    bits: int = 4
    kl_weight: float = 1.0
    prior_inclusion: float = 0.5
    prior_sigma: float = 0.5
    init_inclusion: float = 0.95
    sigma: float = 0.5
    temperature: float = 1.0
    min_temperature: float = 0.05
    anneal_steps: int | None = None
    kl_warmup_steps: int = 0
    seed: int = 0
    logit_scale: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        check_number("kl_weight", self.kl_weight, low=0)
        for argument in ("prior_inclusion", "init_inclusion"):
            check_number(argument, getattr(self, argument), 0, 1, low_open=True, high_open=True)
        for argument in ("prior_sigma", "sigma", "temperature", "min_temperature"):
            check_number(argument, getattr(self, argument), low=0, low_open=True)
        if self.min_temperature > self.temperature:
            raise bad_value(
                "min_temperature", self.min_temperature, f"at most temperature={self.temperature}"
            )
        check_int("anneal_steps", self.anneal_steps, minimum=1, allow_none=True)
        check_int("kl_warmup_steps", self.kl_warmup_steps, minimum=0)
        check_int("seed", self.seed)
        check_number("logit_scale", self.logit_scale, low=0, low_open=True)


class SQS(FakeQuantStage):
    """Prune and quantize at once: a spike-and-slab posterior per weight whose slab is a
    Gaussian mixture on a ``bits``-bit grid, trained with the ELBO (Wang et al., "SQS").

    Every target layer gets a learned inclusion probability per weight (the spike at zero is
    pruning) and learned mixture weights over the levels of a symmetric per-channel grid (its
    step fixed from the initial weights); the forward uses a relaxed-Bernoulli gate sample times
    the responsibility-weighted grid level (``ppq_lightning.ops.sqs``, which also says what is
    approximated). The ELBO's KL term is added to the gradients after every backward (a
    callback cannot change the model's loss)::

        beta(t) * kl_weight * (KL_inclusion + sum pi * slab NLL) / n_weights

    with the prior inclusion ``prior_inclusion`` and component width ``prior_sigma`` (grid
    steps); ``beta`` warms up linearly over ``kl_warmup_steps``. ``kl_weight`` = (weights) /
    (training examples) is the per-example ELBO; larger values follow the prior more (with
    ``prior_inclusion < 0.5``: more zeros). The temperature of the gate and of the mixture
    anneals geometrically from ``temperature`` to ``min_temperature`` over ``anneal_steps``
    (default: the Trainer's ``max_steps``). The gate noise is drawn from a generator seeded by
    ``seed``, the layer and the step (a resumed run draws the same noise).

    When training ends the posterior collapses: weights with ``pi < 1/2`` become exact zeros,
    the rest take their most likely component (exactly on the grid); the grid and the mask of
    non-zero weights (with any earlier mask) are recorded, so later stages, the invariant check
    and every export see an ordinary pruned, quantized layer. Logged every step:
    ``sqs/kl``, ``sqs/sparsity`` (weights with ``pi < 1/2``), ``sqs/temperature``; per layer
    at the end: ``sparsity``, ``bits``, ``levels_used``, ``weight_error``.

    Args:
        bits: bit width of the grid, 2 to 8.
        kl_weight: weight of the KL term, >= 0.
        prior_inclusion: prior probability that a weight is kept, in (0, 1).
        prior_sigma: prior component width in grid steps, > 0.
        init_inclusion: initial inclusion probability of every weight, in (0, 1).
        sigma: the posterior's component width in grid steps, > 0.
        temperature: initial temperature, > 0.
        min_temperature: final temperature, in (0, temperature].
        anneal_steps: steps over which the temperature anneals (None: ``max_steps``).
        kl_warmup_steps: steps of linear KL warm-up, >= 0.
        seed: seed of the gate noise.
        logit_scale: the posterior's logits move this many times faster than the weights
            under the model's optimizer (they are stored divided by it), > 0.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: bits outside 2-8; a negative ``kl_weight``; ``prior_inclusion`` or
            ``init_inclusion`` outside (0, 1); a non-positive ``prior_sigma``, ``sigma`` or
            temperature; ``min_temperature > temperature``; a bad ``anneal_steps``,
            ``kl_warmup_steps``, ``seed`` or ``logit_scale``; at ``setup``, no
            ``anneal_steps`` and no ``max_steps``; use outside ``fit`` (the stage trains).

    Example (YAML)::

        trainer:
          max_steps: 300
          callbacks:
            - class_path: ppq_lightning.callbacks.SQS
              init_args: {bits: 4, kl_weight: 1.0, prior_inclusion: 0.3}
    """

    default_name = "sqs"
    config_class = SQSConfig
    kind = StageKind.PRUNE_QUANTIZE
    completion = "sqs"

    def __init__(
        self,
        bits: int = 4,
        kl_weight: float = 1.0,
        prior_inclusion: float = 0.5,
        prior_sigma: float = 0.5,
        init_inclusion: float = 0.95,
        sigma: float = 0.5,
        temperature: float = 1.0,
        min_temperature: float = 0.05,
        anneal_steps: int | None = None,
        kl_warmup_steps: int = 0,
        seed: int = 0,
        logit_scale: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            bits=bits,
            kl_weight=kl_weight,
            prior_inclusion=prior_inclusion,
            prior_sigma=prior_sigma,
            init_inclusion=init_inclusion,
            sigma=sigma,
            temperature=temperature,
            min_temperature=min_temperature,
            anneal_steps=anneal_steps,
            kl_warmup_steps=kl_warmup_steps,
            seed=seed,
            logit_scale=logit_scale,
            **kwargs,
        )
        self._anneal = anneal_steps

    # -- schedules --------------------------------------------------------------------------
    def temperature_at(self, step: int) -> float:
        """``temperature * (min/temperature) ** (step / anneal_steps)``, held at the minimum."""
        if not self._anneal:
            return self.temperature
        progress = min(step / self._anneal, 1.0)
        return self.temperature * (self.min_temperature / self.temperature) ** progress

    def beta_at(self, step: int) -> float:
        """The KL warm-up factor: ``step / kl_warmup_steps`` up to 1."""
        return 1.0 if not self.kl_warmup_steps else min(step / self.kl_warmup_steps, 1.0)

    def generator(self, posterior: SQSPosterior, device: torch.device) -> torch.Generator:
        """The gate noise of one layer at its current step (reproducible on resume)."""
        seed = (self.seed * 1_000_003 + posterior.layer_seed) * 1_000_033 + int(posterior.step)
        return torch.Generator(device=device).manual_seed(seed % (2**63))

    # -- setup and the end ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.anneal_steps is None:
            if trainer.max_steps in (None, -1):
                raise bad_value(
                    "anneal_steps", None, "an integer >= 1 when the Trainer has no max_steps"
                )
            self._anneal = trainer.max_steps
        super().setup(trainer, pl_module, stage)

    def prepare(self, name: str, module: nn.Module) -> WeightTransform:
        attach_sqs_posterior(
            module, name, self.bits, self.init_inclusion, self.sigma, self.logit_scale
        )
        return partial(sqs_weight, module, self)

    def remove_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return remove_child(module, POSTERIOR_NAME)

    def after_step(self) -> None:
        for module in self._layers.values():
            module.get_submodule(POSTERIOR_NAME).step += 1

    def finalise(self, name: str, module: nn.Module) -> dict[str, float]:
        return finalise_sqs(module, self.history_entry())

    # -- the KL term, added to the gradients after every backward ----------------------------
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._layers:
            return
        total = sum(module.weight.numel() for module in self._layers.values())
        kl, pruned = 0.0, 0
        step = int(next(iter(self._layers.values())).get_submodule(POSTERIOR_NAME).step)
        factor = self.beta_at(step) * self.kl_weight / total
        for module in self._layers.values():  # one layer at a time: the KL is a sum over layers
            posterior: SQSPosterior = module.get_submodule(POSTERIOR_NAME)
            w = as_matrix(module, module.weight).float()
            layer_kl = posterior.kl(w, self.prior_inclusion, self.prior_sigma)
            if factor > 0 and layer_kl.requires_grad:
                add_gradients(trainer, factor * layer_kl, [module.weight, *posterior.parameters()])
            kl += float(layer_kl.detach())
            pruned += int((posterior.inclusion_logit.detach() < 0).sum())
        pl_module.log_dict(
            {
                f"{self.name}/kl": kl / total,
                f"{self.name}/sparsity": pruned / total,
                f"{self.name}/temperature": self.temperature_at(step),
            },
            on_step=True,
            on_epoch=False,
        )
