"""The fit record every state dict of the module carries while a stage of the fit is unfinished.

A training stage (LoRA, QAT, CoDeQ, SQS) records its result on its layers when training ends;
until then the layers hold its training state. A stage that fires later in ``fit``
(``at_epoch``, ``at_step``, after a training stage) is not in the weights until it fires, and a
gradual ``MagnitudePruning(ramp=...)`` grows its masks along the ramp and records its stage only
when the ramp ends. So that every checkpoint written in between (``ModelCheckpoint`` every epoch
or ``n`` steps, ``last.ckpt``, ``trainer.save_checkpoint``, weights-only included: all of them
take ``pl_module.state_dict()``) says what it holds, a ``state_dict`` post-hook adds a
:class:`~ppq_lightning.compressed.history.FitRecord` under
:data:`~ppq_lightning.compressed.history.FIT_RECORD`: the epoch and step, every stage of the fit
with its status (and a ramp's progress), and, while a training stage trains, its entry and
layers.

Two writers: the training stage's own :class:`FitRecorder` (from its ``setup`` until it
finishes), and the fit's, which the Trainer's first compression callback attaches at ``setup``
in ``fit`` and which writes the record (without a training part) whenever the training stage's
does not and some stage of the fit is not applied yet, while that fit runs. Once every stage is
applied, no record. Loading it is ``ppq_lightning.edits.training``'s part.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch import nn
from torch.utils.hooks import RemovableHandle

from ppq_lightning.compressed.history import (
    APPLIED,
    FIT_RECORD,
    PENDING,
    RAMPING,
    TRAINING,
    FitRecord,
    FitStage,
    HistoryEntry,
    RampProgress,
)
from ppq_lightning.edits.training import mark_fitting


class RecordedStage(Protocol):
    """What the record reads of a stage (``base.CompressionCallback``; ``base`` imports this
    module, so it is named by what it provides)."""

    state_key: str
    name: str

    @property
    def kind(self) -> Any: ...

    def already_applied(self, model: nn.Module) -> bool: ...

    def ramp_progress(self, model: nn.Module, step: int) -> RampProgress | None: ...


class TrainingStage(RecordedStage, Protocol):
    """A training stage: also how a fresh model completes it and the entry it records."""

    completion: str

    def history_entry(self) -> HistoryEntry: ...


def _fit_stages(trainer: L.Trainer) -> list[RecordedStage]:
    """The Trainer's compression stages, a schedule's included, in callback order: those of
    every callback with ``compression_stages`` (``base.configured_stages``, which is
    ``base.FiresOnce``'s; ``base`` imports this module, so not the other way round)."""
    return [
        stage
        for callback in trainer.callbacks
        if callable(getattr(callback, "compression_stages", None))
        for stage in callback.compression_stages()
    ]


def _listed(
    stage: RecordedStage, model: nn.Module, step: int, training: TrainingStage | None
) -> FitStage:
    listed: FitStage = {
        "stage": stage.state_key,
        "method": type(stage).__name__,
        "kind": str(stage.kind),
        "name": stage.name,
        "status": PENDING,
    }
    ramp = stage.ramp_progress(model, step)
    if ramp is not None:
        listed["ramp"] = ramp
    if stage.already_applied(model):
        listed["status"] = APPLIED
    elif stage is training:
        listed["status"] = TRAINING
    elif ramp is not None and ramp["masks_recorded"]:
        listed["status"] = RAMPING
    return listed


def fit_record(
    trainer: L.Trainer,
    model: nn.Module,
    training: TrainingStage | None = None,
    layers: Iterable[str] = (),
) -> FitRecord:
    """The fit record of ``model`` now.

    Args:
        trainer: the Trainer fitting ``model``.
        model: the module whose state dict carries the record.
        training: the stage training now (it records its entry and ``layers``); None: no stage
            trains now (the record has no ``training`` part).
        layers: the names of the layers ``training`` trains (relative to ``model``).

    Returns:
        The Trainer's epoch and step, each of its compression stages (a schedule's included, in
        compression order) with its status (and a ramp's progress), and the training stage.
    """
    stages = _fit_stages(trainer)
    if training is not None and training not in stages:
        stages.append(training)
    step = int(trainer.global_step)
    record: FitRecord = {
        "epoch": int(trainer.current_epoch),
        "step": step,
        "stages": [_listed(stage, model, step, training) for stage in stages],
    }
    if training is not None:
        record["training"] = {
            "completion": training.completion,
            "entry": training.history_entry(),
            "layers": list(layers),
        }
    return record


def _running(trainer: L.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING


class FitRecorder:
    """Writes the fit record into every state dict of a module during a fit.

    Args:
        stage: the training stage whose record it writes while it trains (its ``completion``
            names how a fresh model completes it); None: the fit's record, written while the
            fit runs and some stage of it is not applied, unless a training stage's record is
            there already.
    """

    def __init__(self, stage: TrainingStage | None = None) -> None:
        self.stage = stage
        self._handle: RemovableHandle | None = None
        self._module: nn.Module | None = None

    def attach(self, trainer: L.Trainer, module: nn.Module, layers: Iterable[str] = ()) -> None:
        """From now on, ``module.state_dict()`` carries the fit record (until :meth:`detach`).

        Args:
            trainer: the Trainer that fits ``module``.
            module: the LightningModule.
            layers: the names of the layers the training stage trains (relative to ``module``);
                unused by the fit's recorder.
        """
        self.detach()
        stage, layers = self.stage, list(layers)

        def write_training(saved: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any):
            if not stage.already_applied(saved):  # resumed from a checkpoint of the finished stage
                state_dict[prefix + FIT_RECORD] = fit_record(trainer, saved, stage, layers)

        def write_fit(saved: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any):
            if prefix + FIT_RECORD in state_dict or not _running(trainer):
                return  # a training stage's record, or a fit that is over (failed)
            if any(not s.already_applied(saved) for s in _fit_stages(trainer)):
                state_dict[prefix + FIT_RECORD] = fit_record(trainer, saved)

        self._handle = module.register_state_dict_post_hook(
            write_fit if stage is None else write_training
        )
        if stage is None:  # a record it restores is this fit's own: a resume
            self._module = module
            mark_fitting(module, lambda: _running(trainer))

    def detach(self) -> None:
        """Stop writing the fit record (the stage finished, failed, or the run ended)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._module is not None:
            mark_fitting(self._module, None)
            self._module = None
