"""Measuring the metric ``M`` of a LightningModule between compression stages."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torchmetrics import Metric

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import first_loader
from ppq_lightning.errors import PPQConfigError


def evaluation_dataloader(trainer: L.Trainer) -> Iterable[Any]:
    """The dataloader of the running evaluation, else the datamodule's validation one.

    Raises:
        PPQConfigError: when neither exists.
    """
    loaders = None
    if trainer.state.fn == TrainerFn.TESTING:
        loaders = trainer.test_dataloaders
    elif trainer.state.fn == TrainerFn.VALIDATING:
        loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    loaders = first_loader(loaders)
    if loaders is None:
        raise PPQConfigError(
            "evaluate_each_stage=True needs data to evaluate on: pass val dataloaders or a "
            "datamodule with val_dataloader() to the Trainer, or set evaluate_each_stage=False."
        )
    return loaders


def metric_direction(pl_module: L.LightningModule, metric: str) -> bool:
    """Whether a larger ``metric`` is better: ``pl_module.metric_higher_is_better(metric)``
    when the module defines it (``CausalLMModule``: False for ``ppl``, a task metric's declared
    direction), else its ``higher_is_better`` attribute (default False, as for a loss).

    Raises:
        PPQConfigError: from the module, on a metric it does not report.
    """
    direction = getattr(pl_module, "metric_higher_is_better", None)
    if callable(direction):
        return bool(direction(metric))
    return bool(getattr(pl_module, "higher_is_better", False))


@contextlib.contextmanager
def metric_states_kept(module: nn.Module) -> Iterator[None]:
    """Give every torchmetrics ``Metric`` of ``module`` back the state it had on entry.

    An evaluation between stages runs the module's own ``validation_step``, which updates the
    user's stateful metrics (``self.accuracy(preds, y)``); left as they are, the next real
    ``validate`` would average those extra updates into what it reports. On exit each metric's
    states (``tp``, ``total``, ...), update count and cached result are as before, as if the
    evaluation had not happened.
    """
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = [
        (
            {name: copy.deepcopy(getattr(m, name)) for name in m._defaults},
            m._update_count,
            m._computed,
        )
        for m in metrics
    ]
    try:
        yield
    finally:
        for metric, (states, count, computed) in zip(metrics, saved, strict=True):
            for name, value in states.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed


def evaluate_module(pl_module: L.LightningModule, dataloader: Iterable[Any]) -> dict[str, float]:
    """Metrics of ``pl_module`` on ``dataloader``.

    Uses ``pl_module.evaluate(dataloader) -> dict[str, float]`` when the module defines it
    (``CausalLMModule`` does: perplexity), else averages the loss that ``validation_step``
    returns (a tensor, or a dict with ``"loss"``) into ``{"loss": ...}``; the module's
    torchmetrics objects keep their state (:func:`metric_states_kept`).

    Raises:
        PPQConfigError: when the module offers neither, or (for the ``validation_step`` path)
            the dataloader yields no batch.
    """
    evaluate = getattr(pl_module, "evaluate", None)
    if callable(evaluate):
        with metric_states_kept(pl_module):
            return {k: float(v) for k, v in evaluate(dataloader).items()}
    total, count = 0.0, 0
    # every module gets its own mode back, every metric object its own state
    with torch.no_grad(), evaluating(pl_module), metric_states_kept(pl_module):
        for batch_idx, batch in enumerate(dataloader):
            out = pl_module.validation_step(move_data_to_device(batch, pl_module.device), batch_idx)
            loss = out.get("loss") if isinstance(out, dict) else out
            if not isinstance(loss, torch.Tensor):
                raise PPQConfigError(
                    f"{type(pl_module).__name__}.validation_step returned "
                    f"{type(out).__name__}; "
                    "evaluating each stage needs it to return the loss (or a dict with "
                    "'loss'), or the module to define evaluate(dataloader) -> dict."
                )
            total, count = total + float(loss), count + 1
    if not count:
        raise PPQConfigError(
            "the evaluation dataloader yielded no batch: there is no metric to report "
            "(check limit_val_batches, max_eval_windows or the dataset)."
        )
    return {"loss": total / count}
