"""What QAT and CoDeQ share: a stage that trains its layers through a fake-quantizing forward.

Lifecycle in ``fit`` (the base class does not call ``compress`` for a training stage):

- ``setup``: resolve the targets, check every layer, then attach the weight transform
  (``ppq_lightning.modules.transforms``) and create any learnable parameters, before Lightning
  builds the optimizer and restores a checkpoint;
- each step: gradients of weights pruned by earlier stages are zeroed before the optimizer
  step, and the mask is re-applied to the latent weights after it (the mask is read at every
  step, so a pruning stage that fires after ``setup`` is honoured);
- ``on_train_end`` (or ``finish`` from a ``CompressionSchedule``): the quantized weights are
  written into ``module.weight``, the grid, mask and history are recorded, the transform and
  parameters are removed, and the stage is logged.

From ``setup`` until then, every state dict of the module (every checkpoint written during the
fit) carries the fit record (``callbacks.fit_record``): a fresh model that loads one completes the
stage with the same per-layer ``finalise`` (``edits.training.COMPLETIONS[completion]``), as the
model computed at that step; a resumed fit continues from the latent weights and parameters.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from ppq_lightning.calibration.boundary import trace_default_boundary
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.fit_record import FitRecorder
from ppq_lightning.callbacks.stage import StageResult
from ppq_lightning.compressed.state import STATE_NAME, get_state
from ppq_lightning.edits.training import latent_weight
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.attention import check_runs_modules
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.transforms import (
    WeightTransform,
    attach_weight_transform,
    detach_weight_transform,
    has_weight_transform,
)


class FakeQuantStage(CompressionCallback):
    """Base of the training stages whose layers compute with ``fn(latent weight)``.

    Subclasses define :meth:`check_layer`, :meth:`prepare` (returns the transform, may add
    learnable child modules), :meth:`finalise` (writes and records one layer, returns its
    metrics: the function of ``edits.training`` that completes a layer of a checkpoint written
    mid-fit, so a checkpoint loads as the model the stage would have written at that step),
    ``completion`` (that function's key in ``edits.training.COMPLETIONS``) and, if they add
    children, :meth:`remove_parameters`.
    """

    trains = True
    completion: ClassVar[str]  # how a fresh model completes a checkpoint written mid-fit

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._layers: dict[str, nn.Module] = {}
        self._trainer: L.Trainer | None = None
        self._load_hook: Any = None
        self._started = 0.0
        self._fit_record = FitRecorder(self)

    # -- what subclasses define -----------------------------------------------------------
    def check_layer(self, name: str, module: nn.Module) -> None:
        """Raise a ``PPQConfigError`` if the stage cannot train ``module``."""

    def prepare(self, name: str, module: nn.Module) -> WeightTransform:
        """Create the layer's learnable parameters (if any); return its weight transform."""
        raise NotImplementedError

    def finalise(self, name: str, module: nn.Module) -> dict[str, float]:
        """Write the quantized weight of ``module`` and record it; return its metrics."""
        raise NotImplementedError

    def remove_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """Remove the learnable parameters :meth:`prepare` added; return them."""
        return []

    # -- setup: before the optimizer is built and a checkpoint restored --------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.FITTING or self._layers or self.already_applied(pl_module):
            return  # outside fit, the base class refuses the stage once the model is restored
        trace_default_boundary(pl_module, self.targets, trainer, None, self.forward_fn)
        modules = resolve_targets(pl_module, self.targets, self.ignore)
        check_runs_modules(modules, f"{self.name}'s fake-quantizing forward")
        for name, module in modules.items():  # check every layer before touching any
            if has_weight_transform(module):
                raise PPQConfigError(
                    f"{self.name}: {name} already has a training-time weight "
                    "transform (another QAT/CoDeQ stage): one training stage per fit."
                )
            self.check_layer(name, module)
        for name, module in modules.items():
            attach_weight_transform(module, self.prepare(name, module))
        self._layers, self._trainer = modules, trainer
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._before_restore)
        self._fit_record.attach(trainer, pl_module, list(modules))

    def _before_restore(self, model: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Loading a checkpoint taken after this stage ended: undo ``setup`` before the load."""
        for name in self._layers:
            extra = state_dict.get(f"{prefix}{name}.{STATE_NAME}._extra_state")
            history = extra.get("history", []) if isinstance(extra, dict) else []
            if any(entry.get("stage") == self.state_key for entry in history):
                self.release()
                return

    def release(self) -> list[nn.Parameter]:
        """Detach every transform and remove the learnable parameters (nothing recorded)."""
        self._fit_record.detach()
        removed: list[nn.Parameter] = []
        for module in self._layers.values():
            detach_weight_transform(module)
            removed += self.remove_parameters(module)
        self._layers = {}
        return removed

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_load_hook()  # every checkpoint restore is done by now
        if self.already_applied(pl_module) and self._layers:
            _forget_parameters(trainer, self.release())

    # -- every step: earlier masks stay exact (their gradients are zeroed by the base class) -
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        with torch.no_grad():
            for module in self._layers.values():
                state = get_state(module)
                if state is not None and state.mask is not None:
                    module.weight.mul_(state.mask.to(module.weight.device))
            self.after_step()

    @staticmethod
    def latent_weight(module: nn.Module) -> Tensor:
        """The layer's final latent weight ``(out, in)``, float32, with the recorded mask's
        zeros exact (see ``edits.training.latent_weight``)."""
        return latent_weight(module)

    def after_step(self) -> None:
        """Projections of the stage's own parameters after an optimizer step."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._remove_load_hook()
        self._fit_record.detach()
        if not self._applied:
            self.release()  # leave a plain model (latent weights), nothing recorded
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fit_record.detach()  # a fit that ended before training did (max_steps=0)
        super().teardown(trainer, pl_module, stage)

    # -- the end: write, record, log ------------------------------------------------------
    def finish(self, model: nn.Module, index: int = 1) -> StageResult:
        """End the stage on ``model``: write the quantized weights, record, and summarise."""
        self._fit_record.detach()
        layers: dict[str, dict[str, float]] = {}
        removed: list[nn.Parameter] = []
        with torch.no_grad():
            for name, module in self._layers.items():
                detach_weight_transform(module)
                layers[name] = self.finalise(name, module)
                removed += self.remove_parameters(module)
        self._layers = {}
        self._remove_load_hook()
        if self._trainer is not None:
            _forget_parameters(self._trainer, removed)
        seconds = time.perf_counter() - self._started if self._started else 0.0
        return self.conclude(model, index, layers, seconds)


def _forget_parameters(trainer: L.Trainer, parameters: list[nn.Parameter]) -> None:
    """Drop removed parameters from the optimizers, so that a checkpoint saved later matches
    the model that no longer has them."""
    if not parameters:
        return
    ids = {id(p) for p in parameters}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for parameter in parameters:
            optimizer.state.pop(parameter, None)


def add_gradients(trainer: L.Trainer, loss: Tensor, parameters: list[nn.Parameter]) -> None:
    """Accumulate the gradients of ``loss`` into ``parameters``, as the training loss' own
    backward would have: divided over accumulated batches, scaled like the loss under fp16
    AMP. ``torch.autograd.grad`` (not ``backward``) runs no DDP gradient hooks; ``loss`` is
    the same on every rank, so no all-reduce is needed."""
    loss = loss / trainer.accumulate_grad_batches
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        loss = scaler.scale(loss)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    for parameter, grad in zip(parameters, grads, strict=True):
        if grad is None:
            continue
        if parameter.grad is None:
            parameter.grad = grad.detach().clone()
        else:
            parameter.grad.add_(grad)
