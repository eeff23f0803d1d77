"""When a compression stage fires in ``fit``."""

from __future__ import annotations

import enum


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
