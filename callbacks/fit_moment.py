"""When a compression stage fires in ``fit``."""

from __future__ import annotations

import enum

import lightning as L


class FitMoment(str, enum.Enum):
    """The moment of ``fit`` at which a stage compresses (``validate``/``test``/``predict``
    always fire before their first batch).

    Members:
        START: at ``on_fit_start`` (the default).
        EPOCH: at the start of training epoch ``at_epoch``.
        STEP: before the training batch at global step ``at_step``.
        END: when training ends: the stage comes after a training stage in the callback list
            (``callbacks=[Q, LoRA, P]`` is the order ``Q>L>P``).
        TRAIN: the stage trains (LoRA, QAT, CoDeQ, SQS) and is written when training ends.
        RAMP: gradual magnitude pruning: masks grow along the ramp, recorded when it ends.
    """

    START = "start"
    EPOCH = "epoch"
    STEP = "step"
    END = "end"
    TRAIN = "train"
    RAMP = "ramp"


def training_was_over(trainer: L.Trainer) -> bool:
    """Whether this ``fit`` was resumed from a checkpoint after which no training was left
    (its loop found ``max_steps``/``max_epochs`` reached and skipped ``on_train_start`` and
    ``on_train_end``), as opposed to a fit that had nothing to train on
    (``limit_train_batches=0``, an empty dataloader: a stage waiting for training's end never
    fired)."""
    loop = trainer.fit_loop
    return (
        trainer.ckpt_path is not None
        and trainer.limit_train_batches != 0
        and loop.max_batches != 0
        and loop.done
        and not trainer.interrupted
    )
