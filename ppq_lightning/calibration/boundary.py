"""Finding a model's output layer and stem on a stage's own data, before its default targets
are resolved (``modules.boundary``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ppq_lightning.calibration.data import calibration_batches, default_forward
from ppq_lightning.calibration.distributed import world
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.boundary import (
    boundary_known,
    declared_boundary,
    declares_boundary,
    trace_boundary,
)


def trace_default_boundary(
    model: nn.Module,
    targets: str | list[str] | None,
    trainer: L.Trainer | None = None,
    dataloader: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    quiet: bool = False,
) -> dict[str, str]:
    """Mark ``model``'s output layer and stem, found by one forward of a batch of the stage's
    data, so that its default targets leave them out (``modules.boundary``).

    Nothing is done when ``targets`` are given, when the model declares its boundary
    (``default_ignore``, Hugging Face output embeddings) or was traced already. The batch is
    the first calibration batch (``calibration.data.calibration_batches``: ``dataloader``,
    else the datamodule's ``calibration_dataloader()``, else the running loop's data); with no
    data at all nothing is traced (see ``modules.boundary.boundary_layers`` for what default
    targets are then), and a model that neither has ``example_input_array`` nor declares its
    classifier (timm) gets a warning that its output layer and stem are default targets. A
    forward that fails on the batch is reported as a warning and nothing is traced: the stage
    itself says what its forward needs when it runs the model.

    Args:
        model: the model a stage is about to compress.
        targets: the stage's ``targets`` (None: its default targets).
        trainer: the running Trainer, if any.
        dataloader: the stage's explicit data (``stage.apply(model, dataloader=...)``).
        forward: how the stage calls the model on a batch (its ``forward_fn``).
        quiet: no warning when there is no data yet (a schedule's checks at ``setup``, before
            the running loop's data is reachable: the stage traces again when it runs).

    Returns:
        ``{layer name: "output" | "stem"}`` found now (empty when nothing was traced).
    """
    if targets is not None or declares_boundary(model) or boundary_known(model):
        return {}
    try:  # one batch per rank: the sharded first ``world size`` batches
        batch = calibration_batches(trainer, world()[1], dataloader)[0]
    except PPQConfigError:
        if quiet:
            return {}
        if getattr(model, "example_input_array", None) is None and not declared_boundary(model):
            rank_zero_warn(
                f"[ppq] no data to trace {type(model).__name__}'s output layer and stem on (no "
                "dataloader, Trainer or example_input_array): the default targets include "
                "them. Pass stage.apply(model, dataloader=...), set the model's "
                "example_input_array, or leave them out with `ignore`."
            )
        return {}
    forward = forward or default_forward
    try:
        return trace_boundary(model, lambda: forward(model, batch))
    except Exception as error:  # the user's forward: its stage reports it when it calls it
        rank_zero_warn(
            f"[ppq] one forward of a calibration batch, to find the model's output layer and "
            f"stem, failed ({type(error).__name__}: {error}); the default targets include "
            "them. Set the stage's forward_fn, or the model's example_input_array."
        )
        return {}
