"""Magnitude pruning: zero the weights of smallest absolute value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ppq_lightning.callbacks.base import CompressionCallback, log_metrics
from ppq_lightning.callbacks.fit_moment import FitMoment
from ppq_lightning.compressed.history import RampProgress, StageKind
from ppq_lightning.compressed.state import current_mask, record_mask, record_stage
from ppq_lightning.errors import bad_value, check_choice, check_int, check_number
from ppq_lightning.modules.config import SparsityConfig
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.masks import (
    check_nm_width,
    global_masks,
    nm_mask,
    row_mask,
    unstructured_mask,
)

SCOPES = ("layer", "row", "global")
RAMP_KEYS = ("start_step", "end_step", "every", "initial_sparsity")


def check_ramp(
    ramp: dict[str, Any] | None,
    sparsity: float,
    nm: tuple[int, int] | None,
) -> dict[str, Any] | None:
    """Validate a gradual-pruning ramp; returns it with defaults filled in.

    Raises:
        PPQConfigError: see :class:`MagnitudePruning`.
    """
    if ramp is None:
        return None
    if not isinstance(ramp, dict) or set(ramp) - set(RAMP_KEYS) or "end_step" not in ramp:
        raise bad_value("ramp", ramp, f"a dict with end_step and optionally {RAMP_KEYS}")
    if nm is not None:
        raise bad_value("ramp", ramp, "None with an N:M pattern (ramps are unstructured)")
    ramp = {"start_step": 0, "every": 1, "initial_sparsity": 0.0, **ramp}
    for key in ("start_step", "end_step", "every"):
        check_int(f"ramp.{key}", ramp[key], minimum=0)
    if ramp["end_step"] <= ramp["start_step"]:
        raise bad_value("ramp.end_step", ramp["end_step"], f"> start_step={ramp['start_step']}")
    if ramp["every"] < 1:
        raise bad_value("ramp.every", ramp["every"], "an integer >= 1")
    check_number("ramp.initial_sparsity", ramp["initial_sparsity"], 0, sparsity, high_open=True)
    return ramp


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(SparsityConfig):
    """Magnitude pruning's arguments (see :class:`MagnitudePruning`); ``ramp`` is stored with
    its defaults filled in.

    Raises:
        PPQConfigError: see :class:`MagnitudePruning`.
    """

    scope: str = "layer"
    ramp: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scope", self.scope, SCOPES)
        object.__setattr__(self, "ramp", check_ramp(self.ramp, self.sparsity, self.nm))


class MagnitudePruning(CompressionCallback):
    """Prune the weights of smallest magnitude ``|W|``.

    Fires once, before the first evaluation (``validate``/``test``) or at the start of ``fit``.
    ``sparsity`` is the target fraction of zeros in each layer *including* zeros left by earlier
    stages: weights pruned before stay pruned and count towards it (no regrowth). On a
    quantized layer the survivors are untouched, so they stay on the recorded grid.

    Args:
        sparsity: target fraction of pruned weights, in [0, 1). Optional for ``N:M`` (where it
            is ``1 - N/M``); if given it must equal that.
        pattern: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive input weights,
            e.g. ``"2:4"``).
        scope: for unstructured pruning, where the threshold is taken: ``"layer"`` (each layer
            reaches ``sparsity``), ``"row"`` (each output row does), or ``"global"`` (one
            threshold across all targeted layers).
        ramp: gradual magnitude pruning in ``fit`` (Zhu & Gupta, 2017): ``{"end_step": t1,
            "start_step": t0 (0), "every": k (1), "initial_sparsity": s0 (0)}``. Every ``k``
            optimizer steps from ``t0`` the layers are pruned to
            ``s(t) = s + (s0 - s) (1 - (t - t0) / (t1 - t0))^3``, reaching ``sparsity`` at
            ``t1``; masks only grow, and pruned weights stay 0 while training goes on. The stage
            is recorded (and logged) when the ramp ends; a run resumed mid-ramp continues it.
            Outside ``fit`` the final sparsity is applied at once.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers``,
            ``at_epoch``, ``at_step`` of :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: sparsity outside [0, 1), a pattern other than "unstructured"/"N:M",
            sparsity contradicting N:M, an unknown scope, a ramp with unknown keys, steps not
            ordered ``0 <= start_step < end_step``, ``every`` < 1, ``initial_sparsity`` not in
            [0, sparsity), an N:M pattern, or ``at_epoch``/``at_step``; at run time, an input
            dimension that is not a multiple of M, or a ramp ending at or after ``max_steps``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.MagnitudePruning
              init_args: {sparsity: 0.5, pattern: unstructured, scope: layer}
            - class_path: ppq_lightning.callbacks.MagnitudePruning   # gradual, during fit
              init_args: {sparsity: 0.7, ramp: {start_step: 100, end_step: 1000, every: 100}}
    """

    default_name = "magnitude"
    kind = StageKind.PRUNE
    config_class = MagnitudeConfig

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        scope: str = "layer",
        ramp: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity=sparsity, pattern=pattern, scope=scope, ramp=ramp, **kwargs)
        if ramp is not None and (self.at_epoch is not None or self.at_step is not None):
            raise bad_value("ramp", ramp, "None with at_epoch/at_step (the ramp says when)")

    def check_layers(self, modules: dict[str, nn.Module]) -> None:
        super().check_layers(modules)
        for name, module in modules.items():
            check_nm_width(self.config.nm, weight_matrix(module).shape[1], name)

    # -- gradual pruning in fit --------------------------------------------------------------
    def fit_moment(self, trainer: L.Trainer) -> FitMoment:
        return FitMoment.RAMP if self.ramp is not None else super().fit_moment(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        steps = trainer.max_steps
        ramp = self.ramp
        if (
            stage == "fit"
            and ramp is not None
            and steps not in (None, -1)
            and ramp["end_step"] >= steps
        ):
            raise bad_value("ramp.end_step", ramp["end_step"], f"a step below max_steps={steps}")

    def ramp_sparsity(self, step: int) -> float:
        """The sparsity the ramp asks for at optimizer step ``step``."""
        start, end = self.ramp["start_step"], self.ramp["end_step"]
        progress = min(max((step - start) / (end - start), 0.0), 1.0)
        initial = self.ramp["initial_sparsity"]
        return self.sparsity + (initial - self.sparsity) * (1 - progress) ** 3

    def ramp_progress(self, model: nn.Module, step: int) -> RampProgress | None:
        """How far the ramp had got on ``model`` when optimizer step ``step`` was next (the fit
        record of a checkpoint written then): whether it had recorded masks (it records them
        from the batch at ``start_step`` on) and the fraction of zeros they give its layers,
        measured on the masks; None without a ramp."""
        if self.ramp is None:
            return None
        start, end = self.ramp["start_step"], self.ramp["end_step"]
        recorded = step > start or self.already_applied(model)
        sparsity = None
        if recorded:
            modules = resolve_targets(model, self.targets, self.ignore)
            masks = [m for m in map(current_mask, modules.values()) if m is not None]
            total = sum(int(w.weight.numel()) for w in modules.values())
            sparsity = sum(int((~m).sum()) for m in masks) / total if total else 0.0
        return {
            "start_step": int(start),
            "end_step": int(end),
            "target": float(self.sparsity),
            "masks_recorded": recorded,
            "sparsity": sparsity,
        }

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.ramp is None:
            return super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        step, start = trainer.global_step, self.ramp["start_step"]
        if self._applied or step < start or self.already_applied(pl_module):
            return
        if step >= self.ramp["end_step"]:
            self._fire(trainer, pl_module)  # the last step: the full stage, recorded and logged
        elif (step - start) % self.ramp["every"] == 0:
            modules = resolve_targets(pl_module, self.targets, self.ignore)
            with torch.no_grad():
                for name, mask in self.masks(modules, self.ramp_sparsity(step)).items():
                    record_mask(modules[name], mask)
            log_metrics(trainer, {f"ramp/{self.name}/sparsity": self.ramp_sparsity(step)})

    # -- the pruning itself ------------------------------------------------------------------
    @property
    def layerwise(self) -> bool:
        """Each layer is pruned on its own, unless ``scope: global`` ranks weights across
        layers (or a ramp prunes during training)."""
        return self.scope != "global" and self.ramp is None

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        masks = self.masks(modules, self.sparsity)
        entry = self.history_entry()
        layers = {}
        for name, module in modules.items():
            state = record_mask(module, masks[name])
            record_stage(module, entry)
            layers[name] = {"sparsity": 1 - state.mask.float().mean().item()}
        return layers

    def masks(self, modules: dict[str, nn.Module], sparsity: float) -> dict[str, Tensor]:
        """The masks (True = kept) that bring each of ``modules`` to ``sparsity``."""
        scores = {n: weight_matrix(m).abs() for n, m in modules.items()}  # (out, in)
        keeps = {n: current_mask(m) for n, m in modules.items()}
        if self.config.nm is not None:
            masks = {n: nm_mask(scores[n], *self.config.nm, keep=keeps[n]) for n in modules}
        elif self.scope == "global":
            names = list(modules)
            found = global_masks([scores[n] for n in names], sparsity, [keeps[n] for n in names])
            masks = dict(zip(names, found, strict=True))
        else:
            make = unstructured_mask if self.scope == "layer" else row_mask
            masks = {n: make(scores[n], sparsity, keep=keeps[n]) for n in modules}
        return masks
