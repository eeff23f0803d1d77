"""Apply several compression stages in order and evaluate the model after each."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table
from torch import nn

from ppq_lightning.calibration.boundary import trace_default_boundary
from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import first_calibration_batch, forward_call
from ppq_lightning.callbacks.base import (
    CompressionCallback,
    FiresOnce,
    StageResult,
    check_trainer_stages,
    log_layer_table,
    log_metrics,
)
from ppq_lightning.callbacks.fit_moment import training_was_over
from ppq_lightning.compressed.accounting import CompressionSummary, compression_summary
from ppq_lightning.errors import PPQConfigError, check_bool, check_folder
from ppq_lightning.loggers import run_folder
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.order.evaluation import evaluate_module, evaluation_dataloader
from ppq_lightning.order.grammar import arrange
from ppq_lightning.reports import columns_of, write_table


class CompressionSchedule(FiresOnce):
    """A sequence of compression stages applied in order, with an evaluation after each.

    Fires once, like any compression callback (before the first evaluation, or at fit start).
    After every stage it logs ``stage/<i>_<name>/<metric>`` (e.g. ``stage/1_magnitude/ppl``,
    ``.../sparsity``, ``.../avg_bits``, ``.../nominal_C``, ``.../measured_C``) and per-layer
    metrics; ``stage/0_dense/...`` holds the model before any stage and ``stage/final/...`` the
    model after the whole schedule, whatever the order (the key a sweep over orders optimises,
    e.g. ``stage/final/ppl``). The table of all stages is printed and written as
    ``schedule.json`` and ``schedule.csv`` to ``output_dir`` (default: the run's folder,
    ``ppq_lightning.loggers.run_folder``: the logger's ``log_dir``, ``SAVE_DIR/PROJECT/RUN_ID``
    for a W&B logger). Stages already recorded in the model (a resumed run) are skipped.

    Args:
        stages: the compression callbacks, in compression order (each is used through this
            schedule only: do not also pass it to the Trainer).
        order: an order over the stages' names (``name``, else the method label), e.g.
            ``"Q>P"`` or ``"P1>Q>P2"`` (see ``ppq_lightning.order``): the stages are applied in
            that order instead of list order; stages it does not name are not applied. This is
            the knob a sweep turns.
        evaluate_each_stage: evaluate after every stage (and before the first) as a plain
            ``validate`` would: on the data the running Trainer call evaluates on (in ``fit``,
            its ``val_dataloaders``, the datamodule's or the module's ``val_dataloader()``),
            reporting the module's ``evaluate(dataloader)`` if it has one, else what its
            validation hooks log with ``self.log`` (see ``order.evaluation``).
        output_dir: where to write the report; None for the run's folder (``run_folder``).
        log_layers: log one metric per layer and stage.

    Raises:
        PPQConfigError: when ``stages`` is empty, holds something that is not a compression
            callback, or two stages with the same name (``name``, else the method's default
            name: two unnamed stages of one method collide); ``evaluate_each_stage`` or
            ``log_layers`` not a bool; on a bad ``order`` (unknown or repeated names, empty);
            when it fires, before any stage runs, on a stage whose calibration batch the
            model cannot be called on (:meth:`check_forwards`), or no data to evaluate on.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.CompressionSchedule
              init_args:
                order: Q>P
                stages:
                  - class_path: ppq_lightning.callbacks.MagnitudePruning
                    init_args: {name: P, sparsity: 0.5}
                  - class_path: ppq_lightning.callbacks.RTNQuantization
                    init_args: {name: Q, bits: 4}
    """

    def __init__(
        self,
        stages: list[CompressionCallback],
        order: str | None = None,
        evaluate_each_stage: bool = True,
        output_dir: str | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(stages, (list, tuple)) or not stages:
            raise PPQConfigError(
                f"stages={stages!r} is not allowed: expected a non-empty list "
                "of compression callbacks."
            )
        for stage in stages:
            if not isinstance(stage, CompressionCallback):
                raise PPQConfigError(
                    f"stages contains {stage!r}: expected compression callbacks "
                    "such as MagnitudePruning or RTNQuantization."
                )
        names = [s.name for s in stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            both = [s.state_key for s in stages if s.name == repeated[0]]
            raise PPQConfigError(
                f"stages name two stages {repeated[0]!r} ({' and '.join(both)}): a schedule tells "
                "its stages apart by name in orders, reports and the recorded history; give the "
                "stages distinct `name` arguments (e.g. name='P1', name='P2')."
            )
        widths = {s.b_orig for s in stages}
        if len(widths) > 1:
            listed = ", ".join(f"{s.name}: {s.b_orig}" for s in stages)
            raise PPQConfigError(
                f"stages count compression rates from different b_orig ({listed}): one table "
                "cannot mix them; give every stage the bits of the model's original weights "
                "(16 for fp16/bf16, 32 for float32)."
            )
        check_bool("evaluate_each_stage", evaluate_each_stage)
        check_bool("log_layers", log_layers)
        self.configured = list(stages)
        self.set_order(order)
        self.evaluate_each_stage, self.output_dir, self.log_layers = (
            evaluate_each_stage,
            output_dir,
            log_layers,
        )
        self.results: list[StageResult] = []
        self.dense_evaluation: dict[str, float] = {}

    def set_order(self, order: str | None) -> None:
        """Apply the configured stages in ``order`` (None: list order); see ``order`` above.

        Raises:
            PPQConfigError: on a bad order, more than one training stage, or a stage with
                ``at_epoch``/``at_step``.
        """
        stages = self.configured
        if order is not None:
            stages = arrange(stages, [s.name for s in stages], order)
        training = [s.name for s in stages if s.trains]
        if len(training) > 1:
            raise PPQConfigError(
                f"stages train more than once ({', '.join(training)}): one training stage "
                "(LoRA, QAT, CoDeQ) per fit; run a second fit for another."
            )
        timed = [s.name for s in stages if s.at_epoch is not None or s.at_step is not None]
        if timed:
            raise PPQConfigError(
                f"stages {timed} set at_epoch/at_step: a schedule applies its stages in order "
                "(at fit start, and after its training stage); pass timed stages to the Trainer."
            )
        self.stages = list(stages)

    @property
    def order(self) -> str:
        """The compression order, e.g. ``"magnitude>rtn"``."""
        return ">".join(stage.name for stage in self.stages)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stages=[s.state_key for s in self.stages])

    @property
    def training_stage(self) -> CompressionCallback | None:
        """The stage that trains in ``fit`` (LoRA, QAT, CoDeQ), if any."""
        return next((s for s in self.stages if s.trains), None)

    def _fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the stages before the training stage (all of them when none trains)."""
        if self._applied:
            return
        self._applied = True
        self._trace_boundary(trainer, pl_module)
        if not self.dense_evaluation:  # else measured in setup, before a training transform
            self.start_summary = compression_summary(pl_module, self.stages[0].b_orig)
        self.check_forwards(pl_module, trainer)
        if self.evaluate_each_stage:
            if not self.dense_evaluation:
                self.dense_evaluation = self._evaluate(trainer, pl_module)
            log_metrics(
                trainer, {f"stage/0_dense/{k}": v for k, v in self.dense_evaluation.items()}
            )
        training = self.training_stage
        if training is not None and trainer.state.fn != TrainerFn.FITTING:
            if not training.already_applied(pl_module):
                raise PPQConfigError(
                    f"stage {training.name} ({type(training).__name__}) trains: a "
                    f"schedule holding it belongs in `fit`, not in `{trainer.state.fn}`."
                )
            training = None
        before = self.stages if training is None else self.stages[: self.stages.index(training)]
        self._apply(trainer, pl_module, before)
        if training is None:
            self._report(trainer)
        else:
            training.on_fit_start(trainer, pl_module)

    def check_forwards(self, model: nn.Module, trainer: L.Trainer | None = None) -> None:
        """Check, before the first stage changes any weight, that the default forward can call
        the model on the first calibration batch when a pending stage runs the model through it
        (``CompressionStage.runs_default_forward``): a schedule whose GPTQ cannot read the batch
        must not prune first. The batch is read once, for all of them.

        Raises:
            PPQConfigError: naming those stages, the module, its forward, the batch and
                ``forward_fn`` (``calibration.data.forward_call``); or missing calibration data.
        """
        pending = [s for s in self.stages if not s.trains and not s.already_applied(model)]
        stages = [s for s in pending if s.runs_default_forward()]
        calibrated = [s for s in pending if s.reads_layer_inputs]
        if not stages and not calibrated:
            return
        batch = first_calibration_batch(trainer)
        if stages:
            try:
                forward_call(model, batch)
            except PPQConfigError as error:
                names = ", ".join(f"{s.name!r} ({type(s).__name__})" for s in stages)
                raise PPQConfigError(
                    f"schedule {self.order}: stage(s) {names} run the model on calibration "
                    f"batches and cannot call it, so no stage was applied: {error}"
                ) from error
        for stage in calibrated:
            self._check_targets_run(model, stage, batch)

    def _check_targets_run(self, model: nn.Module, stage: CompressionCallback, batch: Any) -> None:
        """Refuse a calibrated stage some of whose targets the forward never calls as modules
        (a layer the model skips, or reads as a tensor): they would have no statistics, and the
        stage would fail after the stages before it changed the model.

        Raises:
            PPQConfigError: naming the layers, the stage and ``ignore``.
        """
        layers = resolve_targets(model, stage.targets, stage.ignore)
        ran: set[str] = set()
        handles = [
            module.register_forward_hook(lambda *_, name=name: ran.add(name))
            for name, module in layers.items()
        ]
        try:
            with torch.no_grad(), evaluating(model):
                stage.model_forward(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        never = [name for name in layers if name not in ran]
        if never:
            listed = ", ".join(never[:3]) + (
                f" and {len(never) - 3} more" if len(never) > 3 else ""
            )
            raise PPQConfigError(
                f"schedule {self.order}: stage {stage.name!r} ({type(stage).__name__}) targets "
                f"{listed}, which the model's forward never calls as modules on a calibration "
                "batch (it skips them or reads their weights as tensors): they would have no "
                "statistics, so no stage was applied. List them in that stage's `ignore`."
            )

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The module's metrics now, as a plain ``validate`` would report them
        (``order.evaluation``)."""
        return evaluate_module(pl_module, evaluation_dataloader(trainer), trainer)

    def _trace_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the model's output layer and stem before the dense row is measured, so that
        every row counts the same layers (``calibration.boundary``; once per model)."""
        stage = next((s for s in self.stages if s.targets is None), None)
        if stage is not None:
            trace_default_boundary(pl_module, None, trainer, None, stage.forward_fn)

    def check_ahead(self, model: nn.Module) -> None:
        """Check every stage still to run (and the report folder) before the first one changes
        any weight: a schedule whose third stage cannot run must not prune first.

        Raises:
            PPQConfigError: what a pending stage's :meth:`CompressionCallback.check_ahead`
                raises, or a ``report_dir`` that is a file.
        """
        if self.output_dir is not None:
            check_folder("report_dir", self.output_dir)
        pending = [s for s in self.stages if not s.already_applied(model)]
        for i, stage in enumerate(pending):
            stage.check_ahead(model, pending[:i])

    def _apply(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stages: list[CompressionCallback]
    ) -> None:
        done: list[str] = []
        for stage in stages:
            index = self.stages.index(stage) + 1
            if stage.already_applied(pl_module):
                rank_zero_info(f"[ppq] {stage.state_key} is already applied; skipped.")
                continue
            try:
                if stage.trains:
                    result = stage.finish(pl_module, index)
                else:
                    result = stage.apply(pl_module, trainer, index=index)
            except Exception as error:
                if done:
                    error.add_note(
                        f"[ppq] schedule {self.order}: stage(s) {', '.join(done)} had been "
                        f"applied before {stage.name} failed; the model holds their result."
                    )
                raise
            done.append(stage.name)
            self._record(trainer, pl_module, result)

    def _record(
        self, trainer: L.Trainer, pl_module: L.LightningModule, result: StageResult
    ) -> None:
        if self.evaluate_each_stage:
            result.evaluation = self._evaluate(trainer, pl_module)
        self.results.append(result)
        log_metrics(trainer, result.metrics(self.log_layers))
        log_layer_table(trainer, result)

    # -- fit: the training stage's hooks, then the stages after it -------------------------
    def compression_stages(self) -> list[CompressionCallback]:
        return list(self.stages)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the stages against the Trainer's others and the model's history (see
        ``CompressionCallback.setup``), then set up the training stage.

        Raises:
            PPQConfigError: see ``callbacks.base.check_trainer_stages`` (which runs
                ``CompressionCallback.check_not_replaced``) and :meth:`check_ahead`.
        """
        super().setup(trainer, pl_module, stage)
        check_trainer_stages(trainer.callbacks, pl_module)
        if not self._applied:  # every pending stage, before the first changes anything
            self.check_ahead(pl_module)
        training = self.training_stage
        if training is not None:
            if (
                stage == TrainerFn.FITTING
                and self.evaluate_each_stage
                and not self._applied
                and not training.already_applied(pl_module)
            ):  # the training stage attaches its transform now: measure the dense model first
                self._trace_boundary(trainer, pl_module)
                self.start_summary = compression_summary(pl_module, self.stages[0].b_orig)
                self.dense_evaluation = self._evaluate(trainer, pl_module)
            training.setup(trainer, pl_module, stage)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A run resumed with ``ckpt_path``: check the stages against the restored model's
        history (``CompressionCallback.check_not_replaced``) before any of them is applied.

        Raises:
            PPQConfigError: naming the stage, what the model records and what is configured.
        """
        check_trainer_stages(trainer.callbacks, pl_module)
        if self.training_stage is not None:
            self.training_stage.on_load_checkpoint(trainer, pl_module, checkpoint)

    def _delegate(self, hook: str, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """Call the training stage's ``hook`` while it trains (after the stages before it,
        before it finishes), or after it finished for the hooks of :data:`AFTER_TRAINING`."""
        training = self.training_stage
        if training is None or not self._applied:
            return
        if not training._applied or hook in AFTER_TRAINING:
            getattr(training, hook)(trainer, *args, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        training = self.training_stage
        if training is None or not self._applied:
            return
        self._apply(trainer, pl_module, self.stages[self.stages.index(training) :])
        self._report(trainer)
        training.on_train_end(trainer, pl_module)  # finished above: only its own additions run

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Complete a fit resumed from a checkpoint written at its last step: Lightning finds
        ``max_steps``/``max_epochs`` reached and skips the training loop with its
        ``on_train_end``, where the training stage finishes (LoRA's merge, QAT's final
        quantization), the stages after it apply and the report is written. A run killed after
        that checkpoint and before the report ended, resumed with ``--ckpt_path``, does that
        work now, as the uninterrupted run did at ``on_train_end``."""
        training = self.training_stage
        if (
            training is not None
            and self._applied
            and not training.already_applied(pl_module)
            and training_was_over(trainer)
        ):
            rank_zero_info(
                f"[ppq] fit resumed at its end (global step {trainer.global_step}): finishing "
                f"{training.name} and the stages after it, as the interrupted run was about to"
            )
            self.on_train_end(trainer, pl_module)
        self._delegate("on_fit_end", trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Whether the schedule fired, each stage's own callback state, and the report's rows
        so far (the dense model's and each applied stage's: a fit resumed from a checkpoint
        taken after the stages before its training stage writes them again)."""
        return {
            **super().state_dict(),
            "stages": [s.state_dict() for s in self.stages],
            "report": self._report_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for stage, state in zip(self.stages, state_dict.get("stages", ()), strict=False):
            stage.load_state_dict(state)
        if "report" in state_dict:
            self._load_report_state(state_dict["report"])

    def _report_state(self) -> dict[str, Any]:
        """The rows of the report as plain values (a checkpoint loads with
        ``weights_only=True``)."""
        start = getattr(self, "start_summary", None)
        return {
            "dense_evaluation": dict(self.dense_evaluation),
            "start_summary": None if start is None else start.as_dict(),
            "results": [
                {f.name: getattr(r, f.name) for f in fields(r) if f.name != "summary"}
                | {"summary": r.summary.as_dict()}
                for r in self.results
            ],
        }

    def _load_report_state(self, report: dict[str, Any]) -> None:
        self.dense_evaluation = dict(report.get("dense_evaluation") or {})
        if report.get("start_summary") is not None:
            self.start_summary = CompressionSummary(**report["start_summary"])
        self.results = [
            StageResult(**{**r, "summary": CompressionSummary(**r["summary"])})
            for r in report.get("results", ())
        ]

    def rows(self) -> list[dict[str, Any]]:
        """The schedule's table: the model before any stage, then one row per stage."""
        rows: list[dict[str, Any]] = []
        if self.dense_evaluation:
            rows.append(
                {
                    "stage": "0_dense",
                    "kind": "-",
                    **self.start_summary.as_dict(),
                    **self.dense_evaluation,
                }
            )
        for r in self.results:
            rows.append(
                {
                    "stage": f"{r.index}_{r.name}",
                    "kind": r.kind,
                    **r.summary.as_dict(),
                    "seconds": r.seconds,
                    **r.evaluation,
                    **r.calibration,
                }
            )
        return rows

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        rows = self.rows()
        if not rows:
            return
        folder = Path(self.output_dir or run_folder(trainer))
        report = {
            "order": self.order,
            "stages": rows,
            "layers": {f"{r.index}_{r.name}": r.layers for r in self.results},
        }
        write_table(rows, folder, "schedule", json_data=report, formats=("csv", "json"))
        final = {
            f"stage/final/{k}": float(v)
            for k, v in rows[-1].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        log_metrics(trainer, final)
        evaluated = columns_of([self.dense_evaluation, *(r.evaluation for r in self.results)])
        columns = columns_of(rows)
        summary = ("stage", "kind", "sparsity", "avg_bits", "nominal_C", "measured_C")
        shown = [c for c in (*summary, *evaluated, "seconds") if c in columns]
        table = Table(title=f"Compression schedule {self.order}")
        for column in shown:
            table.add_column(column, justify="left" if column in ("stage", "kind") else "right")
        for row in rows:
            table.add_row(*[_fmt(row.get(c)) for c in shown])
        Console(width=max(120, Console().width)).print(table)
        rank_zero_info(f"[ppq] schedule report written to {folder}/schedule.json")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _forwarding(hook: str) -> Any:
    """``CompressionSchedule.<hook>``: the schedule's own behaviour (``FiresOnce``'s), then the
    training stage's ``hook`` while it trains."""

    def forward(self: CompressionSchedule, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        getattr(super(CompressionSchedule, self), hook)(trainer, *args, **kwargs)
        self._delegate(hook, trainer, *args, **kwargs)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"Forward ``{hook}`` to the schedule's training stage while it trains."
    return forward


AFTER_TRAINING = frozenset({"on_fit_end", "on_save_checkpoint", "on_exception", "teardown"})
"""Hooks that reach the training stage after it finished too (a fit ends after training)."""
OWN_HOOKS = frozenset({"on_fit_start", "on_train_end", "on_fit_end", "on_load_checkpoint"})
"""The hooks the schedule drives itself: ``on_fit_start`` applies the stages before the training
stage and then starts it, ``on_train_end`` finishes it and applies the rest, ``on_fit_end`` does
that for a fit resumed at its end (Lightning skips ``on_train_end`` then),
``on_load_checkpoint`` checks every stage against the restored model."""
FORWARDED_HOOKS = (
    *sorted(h for h in vars(L.Callback) if h.startswith("on_") and h not in OWN_HOOKS),
    "teardown",
)
"""Every other Lightning hook reaches the training stage (``on_train_batch_end``,
``on_validation_epoch_end``, ``on_save_checkpoint``, ``teardown``, ...), and the schedule's own
three call it after their work: whatever a training stage implements works inside a schedule as
it does as a Trainer callback (its state is saved in the schedule's)."""
for _hook in FORWARDED_HOOKS:
    setattr(CompressionSchedule, _hook, _forwarding(_hook))
