"""Calibration data: where the batches come from when a stage runs inside a Trainer, and how a
batch is fed to the model."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from ppq_lightning.calibration.distributed import shard, world
from ppq_lightning.errors import PPQConfigError, check_int

FORWARD_FN_HELP = (
    "set the stage's `forward_fn` to say how the model is called on a batch, e.g. "
    "stage.forward_fn = lambda model, batch: model(batch['image']) "
    "(OrderStudy(forward_fn=...) for a study)"
)


def check_num_batches(value: int) -> int:
    """Validate ``num_calibration_batches``: an integer >= 1."""
    return check_int("num_calibration_batches", value, minimum=1)


def batch_input(batch: Any) -> Any:
    """What the model is called with: a tensor batch, ``batch["input_ids"]``, or ``batch[0]``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise PPQConfigError(
                f"a batch is a dict with keys {sorted(batch)}; expected 'input_ids' (a tensor "
                f"batch or a list/tuple whose first item is the input work as they are), or "
                f"{FORWARD_FN_HELP}."
            )
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise PPQConfigError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: expected a "
        f"tensor, a dict with 'input_ids' or a non-empty list/tuple, or {FORWARD_FN_HELP}."
    )


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on the batch's input, moved to the device of the model's parameters."""
    device = next(model.parameters()).device
    return model(move_data_to_device(batch_input(batch), device))


def first_loader(loaders: Any) -> Any:
    """The first of a Trainer's dataloaders (Lightning gives a list when there are several),
    or None when there is none."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _running_loader(trainer: L.Trainer) -> tuple[Any, str]:
    fn = trainer.state.fn
    if fn == TrainerFn.FITTING:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader(), "the datamodule's train_dataloader()"
        source = trainer.fit_loop._data_source  # the dataloaders given to fit()
        return (source.dataloader() if source.is_defined() else None), "the train dataloader"
    if fn == TrainerFn.VALIDATING:
        return trainer.val_dataloaders, "the validation dataloader"
    if fn == TrainerFn.TESTING:
        return trainer.test_dataloaders, "the test dataloader"
    if fn == TrainerFn.PREDICTING:
        return trainer.predict_dataloaders, "the predict dataloader"
    return None, "no dataloader"


def calibration_batches(
    trainer: L.Trainer | None, num_batches: int, dataloader: Iterable[Any] | None = None
) -> list[Any]:
    """The first ``num_batches`` calibration batches for a callback running in ``trainer``.

    An explicit ``dataloader`` (from ``stage.apply(model, dataloader=...)``) comes first.
    Taken from ``trainer.datamodule.calibration_dataloader()`` when the datamodule has one, else
    from the running loop's dataloader (the train dataloader in ``fit``, the validation one in
    ``validate``, ...), so that the callbacks work with a user's own plain dataloaders.

    Data-parallel (a ``torch.distributed`` group, e.g. ``Trainer(strategy="ddp")``):
    ``num_batches`` counts over all ranks. An explicit dataloader and the calibration dataloader
    are the same on every rank, so each rank takes every ``world_size``-th of the first
    ``num_batches``; the loop's dataloaders are already sharded by the strategy's sampler, so each
    rank takes its first ``ceil(num_batches / world_size)``.

    Raises:
        PPQConfigError: when there is no trainer, no dataloader, it is empty, or it has fewer
            batches than there are ranks.
    """
    check_num_batches(num_batches)
    if dataloader is not None:
        return shard(list(itertools.islice(dataloader, num_batches)))
    if trainer is None:
        raise PPQConfigError(
            "this method needs calibration data: call apply(model, "
            "dataloader=...) or run it as a callback of a Trainer."
        )
    datamodule = trainer.datamodule
    sharded = not (
        datamodule is not None and callable(getattr(datamodule, "calibration_dataloader", None))
    )
    if not sharded:
        loader, origin = datamodule.calibration_dataloader(), "datamodule.calibration_dataloader()"
    else:
        loader, origin = _running_loader(trainer)
    loader = first_loader(loader)
    if loader is None:
        raise PPQConfigError(
            "no calibration data: give the datamodule a calibration_dataloader() "
            "or pass dataloaders to the Trainer call."
        )
    size = world()[1]
    batches = list(itertools.islice(loader, -(-num_batches // size) if sharded else num_batches))
    if not batches:
        raise PPQConfigError(f"the calibration dataloader ({origin}) is empty.")
    return batches if sharded else shard(batches)
