"""Why a compression stage never fired: the message of ``FiresOnce.teardown``.

A run that was asked to compress and ended with a dense model (``limit_val_batches=0``, an
empty dataloader, a ``fit`` that stopped before a stage's ``at_step``) must not look like a
success; this module words the error, with the likely cause.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from ppq_lightning.errors import PPQConfigError

_LOOPS = {  # Trainer function -> (its limit/num suffix, the loop in words, the hook that fires)
    "validate": ("val", "validation", "on_validation_start"),
    "test": ("test", "test", "on_test_start"),
    "predict": ("predict", "predict", "on_predict_start"),
}


def _training_cause(trainer: L.Trainer) -> str:
    """Why ``fit`` ended before every stage fired, in words."""
    if trainer.max_steps == 0:
        return "max_steps=0: training never ran"
    if trainer.limit_train_batches == 0:
        return "limit_train_batches=0: training never ran"
    if trainer.num_training_batches == 0:
        return "the train dataloader is empty: training never ran"
    if trainer.max_epochs == 0:
        return "max_epochs=0: training never ran"
    return (
        f"training stopped at epoch {trainer.current_epoch}, global step {trainer.global_step} "
        f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, or early stopping)"
    )


def never_fired_error(
    trainer: L.Trainer, fn: str, pending: list[tuple[Any, Any]]
) -> PPQConfigError:
    """The error of ``FiresOnce.teardown``: which stages never fired in ``fn``, and why.

    Args:
        trainer: the Trainer that ran.
        fn: the Trainer function (``"fit"``, ``"validate"``, ...).
        pending: ``(callback, stage)`` pairs: the stages that did not fire and the Trainer
            callback holding each (the stage itself, or its schedule).
    """
    labels = []
    for callback, member in pending:
        where = "" if callback is member else f", in {type(callback).__name__}"
        timing = ""
        if member.at_epoch is not None:
            timing = f", waiting for at_epoch={member.at_epoch}"
        elif member.at_step is not None:
            timing = f", waiting for at_step={member.at_step}"
        labels.append(f"{member.name!r} ({type(member).__name__}{where}{timing})")
    head = (
        f"compression was configured but never applied in `{fn}`: stage(s) "
        f"{', '.join(labels)} did not fire, so the model lacks them and no report of them "
        "was written"
    )
    if fn in _LOOPS:
        key, loop, hook = _LOOPS[fn]
        limit = getattr(trainer, f"limit_{key}_batches")
        batches = getattr(trainer, f"num_{key}_batches")
        if limit == 0:
            cause = f"limit_{key}_batches=0 skips the {loop} loop"
        elif not batches or sum(batches) == 0:
            cause = f"the {loop} dataloader is empty (0 batches), so the {loop} loop was skipped"
        else:
            cause = f"the {loop} loop never started"
        return PPQConfigError(
            f"{head}. Likely cause: {cause}; the compression callbacks fire at {hook}. Give "
            f"limit_{key}_batches > 0 and a {loop} dataloader with at least one batch."
        )
    return PPQConfigError(
        f"{head}. Likely cause: {_training_cause(trainer)}. In fit a stage fires at fit start, "
        "at its at_epoch/at_step, or when the training stage before it ends: let fit reach it "
        "(max_epochs, max_steps, limit_train_batches > 0, a non-empty train dataloader), or "
        "remove it."
    )
