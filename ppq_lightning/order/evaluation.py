"""Measuring the metric ``M`` of a LightningModule between compression stages.

An evaluation between stages measures what a plain ``trainer.validate`` would report, and
leaves the module as ``validate`` would: it runs on the data the Trainer's own loop evaluates on
(:func:`evaluation_dataloader`: the dataloaders given to ``fit``/``validate``, the datamodule's,
or the module's ``val_dataloader()``), and, for a module without an ``evaluate`` method, through
the module's own validation hooks, reporting what it logs with ``self.log`` (accuracy from a
torchmetrics object, a loss, ...), or, when it logs nothing, the loss its ``validation_step``
returns (:func:`evaluate_module`). The logging goes to a result collection of its own: nothing
reaches the loggers, the progress bar or ``trainer.callback_metrics`` (a schedule logs the
results under ``stage/<i>_<name>/...``), and the module's torchmetrics objects get their state
back (:func:`metric_states_kept`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loops import _EvaluationLoop
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn
from torchmetrics import Metric

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import first_loader
from ppq_lightning.errors import PPQConfigError


class FirstBatches:
    """The first ``count`` batches of ``loader``, each time it is iterated (what an evaluation
    loop limited by ``limit_val_batches`` runs)."""

    def __init__(self, loader: Iterable[Any], count: int) -> None:
        self.loader, self.count = loader, count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        return self.count


def _evaluation_loop(trainer: L.Trainer) -> _EvaluationLoop:
    """The loop whose data an evaluation between stages runs on: ``test``'s in ``test``, the
    validation loop of ``fit`` in ``fit``, ``validate``'s otherwise (``validate``, ``predict``)."""
    if trainer.state.fn == TrainerFn.TESTING:
        return trainer.test_loop
    if trainer.state.fn == TrainerFn.FITTING:
        return trainer.fit_loop.epoch_loop.val_loop
    return trainer.validate_loop


def evaluation_dataloader(trainer: L.Trainer) -> Iterable[Any]:
    """The dataloader an evaluation between stages runs on: the one the running Trainer call
    evaluates on, as its loop runs it.

    In ``validate`` and ``test``, the loop's dataloader; in ``fit``, the validation data of
    the fit: the ``val_dataloaders`` given to ``fit``, else the datamodule's or the module's
    ``val_dataloader()``, set up by the fit's validation loop (Lightning's ``setup_data``, with
    its samplers), which then validates on that same loader. Limited to the batches the loop
    runs (``limit_val_batches``/``limit_test_batches``). When the loop will not run
    (``limit_val_batches=0``, or in ``predict``), the whole dataloader of its source; with
    several dataloaders, the first.

    Raises:
        PPQConfigError: when there is no validation data.
    """
    loop = _evaluation_loop(trainer)
    fn = trainer.state.fn
    if fn in (TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING):
        if loop._combined_loader is None and trainer.lightning_module is not None:
            loop.setup_data()  # what the loop does when it starts; it reuses the loader in fit
        combined = loop._combined_loader
        if combined is not None and combined.flattened:
            loader, count = combined.flattened[0], loop.max_batches[0]
            if math.isinf(count) or (hasattr(loader, "__len__") and count >= len(loader)):
                return loader
            return FirstBatches(loader, int(count))
    source = loop._data_source
    loader = None
    if source.instance is not None and source.is_defined():
        loader = first_loader(_request_dataloader(source))
    if loader is None:
        raise PPQConfigError(
            "evaluate_each_stage=True needs data to evaluate on: pass val dataloaders to "
            "trainer.fit/validate, give the datamodule or the module a val_dataloader(), or set "
            "evaluate_each_stage=False."
        )
    return loader


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


@contextlib.contextmanager
def _logging_apart(trainer: L.Trainer) -> Iterator[_ResultCollection]:
    """While in the context, ``self.log`` of the trainer's module writes into a result
    collection of its own (yielded), as in a ``validate`` run: the trainer's running stage is
    validation, its loops' results, the logger connector's state and the trainer's state are
    given back on exit, so the running loop, its loggers and ``callback_metrics`` see nothing."""
    results = _ResultCollection(training=False)
    state, connector = trainer.state, trainer._logger_connector
    saved_state = (state.fn, state.stage)
    saved_connector = (connector._current_fx, connector._first_loop_iter)
    try:
        if state.fn not in (TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING):
            state.fn = TrainerFn.VALIDATING  # predict: log as validate would
        state.stage = RunningStage.VALIDATING
        loop = trainer._active_loop  # the evaluation loop of the running call
        saved_results, loop._results = loop._results, results
        connector._current_fx, connector._first_loop_iter = None, None
        try:
            yield results
        finally:
            loop._results = saved_results
    finally:
        state.fn, state.stage = saved_state
        connector._current_fx, connector._first_loop_iter = saved_connector


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss a ``validation_step`` returns: a tensor, or a dict's tensor ``"loss"``."""
    loss = output.get("loss") if isinstance(output, dict) else output
    return loss if isinstance(loss, torch.Tensor) else None


def _validate_in(
    trainer: L.Trainer, pl_module: L.LightningModule, dataloader: Iterable[Any]
) -> tuple[dict[str, float], list[Any]]:
    """Run the module's validation hooks over ``dataloader`` inside the running ``trainer`` as
    its evaluation loop would (batch transfer hooks and precision, ``on_validation_epoch_start``,
    ``on_validation_batch_start``, ``validation_step``, ``on_validation_batch_end``,
    ``on_validation_epoch_end``; the callbacks' hooks are not called). Returns what the module
    logged (the epoch-level values ``validate`` returns) and every step's output."""
    outputs: list[Any] = []
    takes_index = is_param_in_hook_signature(pl_module.validation_step, "batch_idx", min_args=2)
    with _logging_apart(trainer) as results:
        call._call_lightning_module_hook(trainer, "on_validation_epoch_start")
        for batch_idx, batch in enumerate(dataloader):
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = call._call_strategy_hook(
                trainer, "batch_to_device", batch, device=pl_module.device, dataloader_idx=0
            )
            trainer._logger_connector.on_batch_start(batch)
            call._call_lightning_module_hook(trainer, "on_validation_batch_start", batch, batch_idx)
            step = (batch, batch_idx) if takes_index else (batch,)
            output = call._call_strategy_hook(trainer, "validation_step", *step)
            call._call_lightning_module_hook(
                trainer, "on_validation_batch_end", output, batch, batch_idx
            )
            results.batch = results.batch_size = None
            outputs.append(output)
        trainer._logger_connector.epoch_end_reached()
        results.dataloader_idx = None
        call._call_lightning_module_hook(trainer, "on_validation_epoch_end")
        logged = {
            name: float(value) for name, value in results.metrics(on_step=False)["log"].items()
        }
    return logged, outputs


class _StepOutputs(L.Callback):
    """Keeps every ``validation_step`` output of a ``validate`` run."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.outputs.append(outputs)


def _validate_alone(
    pl_module: L.LightningModule, dataloader: Iterable[Any]
) -> tuple[dict[str, float], list[Any]]:
    """``validate`` ``pl_module`` on ``dataloader`` in a Trainer of its own (on the module's
    device; no logger, checkpoint, progress bar or summary): what the module logs (the
    epoch-level values ``validate`` returns) and every step's output. The module keeps the
    Trainer it was attached to."""
    device = pl_module.device
    steps = _StepOutputs()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps],
    )
    if isinstance(dataloader, (list, tuple)):  # batches (a study's), not several dataloaders
        dataloader = FirstBatches(dataloader, len(dataloader))
    attached = pl_module._trainer
    try:
        results = trainer.validate(pl_module, dataloaders=dataloader, verbose=False)
    finally:
        pl_module.trainer = attached
    logged = {name: float(value) for name, value in (results[0] if results else {}).items()}
    return logged, steps.outputs


def evaluate_module(
    pl_module: L.LightningModule, dataloader: Iterable[Any], trainer: L.Trainer | None = None
) -> dict[str, float]:
    """Metrics of ``pl_module`` on ``dataloader``.

    Uses ``pl_module.evaluate(dataloader) -> dict[str, float]`` when the module defines it
    (``CausalLMModule``: perplexity; ``ImageClassifierModule``: accuracy). Otherwise runs the
    module's validation as a plain ``validate`` would, reporting what the module logs with
    ``self.log`` (its epoch-level values, under the names ``validate`` returns: ``val_acc``,
    ``val/loss``, ...): inside a running ``trainer`` (the one ``pl_module`` is attached to), or,
    without one (an ``OrderStudy``'s cells), in a ``validate`` of a Trainer of its own. A
    module that logs nothing there gets the loss its ``validation_step`` returns (a tensor, or
    a dict with ``"loss"``), averaged over the batches, as ``loss``. Evaluation runs in eval
    mode without gradients; every module gets its mode back and the module's torchmetrics
    objects their state (:func:`metric_states_kept`).

    Args:
        pl_module: the module to evaluate.
        dataloader: the data (see :func:`evaluation_dataloader` inside a Trainer).
        trainer: the running Trainer ``pl_module`` is attached to, whose machinery runs the
            validation hooks and collects what they log; None outside a Trainer (a Trainer of
            the evaluation's own then runs ``validate``).

    Raises:
        PPQConfigError: when the module defines neither ``evaluate`` nor ``validation_step``,
            when it logs no metric and returns no loss, or when the dataloader yields no batch.
    """
    evaluate = getattr(pl_module, "evaluate", None)
    if callable(evaluate):
        with metric_states_kept(pl_module):
            return {k: float(v) for k, v in evaluate(dataloader).items()}
    name = type(pl_module).__name__
    if not is_overridden("validation_step", pl_module, L.LightningModule):
        raise PPQConfigError(
            f"{name} defines neither validation_step nor evaluate(dataloader) -> dict: "
            "evaluating each stage needs one of them (or evaluate_each_stage=False)."
        )
    inside = trainer is not None and trainer.lightning_module is pl_module
    # every module gets its own mode back, every metric object its own state
    with torch.no_grad(), evaluating(pl_module), metric_states_kept(pl_module):
        if inside:
            logged, outputs = _validate_in(trainer, pl_module, dataloader)
        else:
            logged, outputs = _validate_alone(pl_module, dataloader)
    if not outputs:
        raise PPQConfigError(
            "the evaluation dataloader yielded no batch: there is no metric to report "
            "(check limit_val_batches, max_eval_windows or the dataset)."
        )
    if logged:
        return logged
    losses = [_loss_of(output) for output in outputs]
    if any(loss is None for loss in losses):
        returned = type(outputs[losses.index(None)]).__name__
        raise PPQConfigError(
            f"{name}.validation_step returned {returned}; evaluating each stage reports what "
            "the module logs in validation (self.log, inside a running Trainer), or else the "
            "loss validation_step returns (a tensor, or a dict with 'loss'): log a metric or "
            f"return the loss, or give {name} an evaluate(dataloader) -> dict method."
        )
    return {"loss": sum(float(loss) for loss in losses) / len(losses)}
