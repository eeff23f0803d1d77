"""The fit record a training stage writes into every state dict of the module while it trains.

A training stage (LoRA, QAT, CoDeQ, SQS) records its result on its layers when training ends;
until then the layers hold its training state. So that every checkpoint written in between
(``ModelCheckpoint`` every epoch or ``n`` steps, ``last.ckpt``, ``trainer.save_checkpoint``,
weights-only included: all of them take ``pl_module.state_dict()``) says what it holds, the stage
registers a ``state_dict`` post-hook on the module from ``setup`` until it finishes; the hook
adds a :class:`~ppq_lightning.compressed.history.FitRecord` under
:data:`~ppq_lightning.compressed.history.FIT_RECORD`: the epoch and step, every stage of the fit
with its status, and the training stage's entry and layers. Loading it is
``ppq_lightning.edits.training``'s part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
from torch import nn
from torch.utils.hooks import RemovableHandle

from ppq_lightning.callbacks.base import configured_stages
from ppq_lightning.compressed.history import (
    APPLIED,
    FIT_RECORD,
    PENDING,
    TRAINING,
    FitRecord,
    FitStage,
)

if TYPE_CHECKING:
    from ppq_lightning.callbacks.base import CompressionCallback


def fit_record(
    trainer: L.Trainer, model: nn.Module, training: CompressionCallback, layers: list[str]
) -> FitRecord:
    """The fit record of ``model`` now: the Trainer's epoch and step, each of its compression
    stages (a schedule's included, in compression order) with its status, and the stage
    ``training`` (training its ``layers``) with the entry it records when it finishes."""
    stages = configured_stages(trainer.callbacks)
    if training not in stages:
        stages.append(training)

    def status(stage: CompressionCallback) -> str:
        if stage.already_applied(model):
            return APPLIED
        return TRAINING if stage is training else PENDING

    listed: list[FitStage] = [
        {
            "stage": stage.state_key,
            "method": type(stage).__name__,
            "kind": str(stage.kind),
            "name": stage.name,
            "status": status(stage),
        }
        for stage in stages
    ]
    return {
        "epoch": int(trainer.current_epoch),
        "step": int(trainer.global_step),
        "stages": listed,
        "training": {
            "completion": training.completion,
            "entry": training.history_entry(),
            "layers": list(layers),
        },
    }


class FitRecorder:
    """Writes the fit record into every state dict of a module while its stage trains.

    Args:
        stage: the training stage (its ``completion`` names how a fresh model completes it).
    """

    def __init__(self, stage: CompressionCallback) -> None:
        self.stage = stage
        self._handle: RemovableHandle | None = None

    def attach(self, trainer: L.Trainer, module: nn.Module, layers: list[str]) -> None:
        """From now on, ``module.state_dict()`` carries the fit record (until :meth:`detach`).

        Args:
            trainer: the Trainer that fits ``module``.
            module: the LightningModule.
            layers: the names of the layers the stage trains (relative to ``module``).
        """
        self.detach()
        stage, layers = self.stage, list(layers)

        def write(saved: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            if not stage.already_applied(saved):  # resumed from a checkpoint of the finished stage
                state_dict[prefix + FIT_RECORD] = fit_record(trainer, saved, stage, layers)

        self._handle = module.register_state_dict_post_hook(write)

    def detach(self) -> None:
        """Stop writing the fit record (the stage finished, failed, or the run ended)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
