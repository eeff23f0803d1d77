"""Apply several compression stages in order and evaluate the model after each."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table

from ppq_lightning.callbacks.base import (
    CompressionCallback,
    FiresOnce,
    StageResult,
    log_layer_table,
    log_metrics,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.evaluation import evaluate_module, evaluation_dataloader
from ppq_lightning.metrics import compression_summary
from ppq_lightning.order import arrange


class CompressionSchedule(FiresOnce):
    """A sequence of compression stages applied in order, with an evaluation after each.

    Fires once, like any compression callback (before the first evaluation, or at fit start).
    After every stage it logs ``stage/<i>_<name>/<metric>`` (e.g. ``stage/1_magnitude/ppl``,
    ``.../sparsity``, ``.../avg_bits``, ``.../nominal_C``, ``.../measured_C``) and per-layer
    metrics; ``stage/0_dense/...`` holds the model before any stage. The table of all stages is
    printed and written as ``schedule.json`` and ``schedule.csv`` to ``output_dir`` (default: the
    trainer's log directory). Stages already recorded in the model (a resumed run) are skipped.

    Args:
        stages: the compression callbacks, in compression order (each is used through this
            schedule only: do not also pass it to the Trainer).
        order: an order over the stages' names (``name``, else the method label), e.g.
            ``"Q>P"`` or ``"P1>Q>P2"`` (see ``ppq_lightning.order``): the stages are applied in
            that order instead of list order; stages it does not name are not applied. This is
            the knob a sweep turns.
        evaluate_each_stage: evaluate after every stage (and before the first) on the running
            evaluation's dataloader or the datamodule's ``val_dataloader``.
        output_dir: where to write the report; None for the trainer's ``log_dir``.
        log_layers: log one metric per layer and stage.

    Raises:
        PPQConfigError: when ``stages`` is empty, holds something that is not a compression
            callback, or two stages with the same state key; on a bad ``order`` (unknown or
            repeated names, empty).

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
        keys = [s.state_key for s in stages]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise PPQConfigError(
                f"stages repeat {repeated[0]!r}: give repeated stages distinct `name` arguments."
            )
        if order is not None:
            stages = arrange(stages, [s.display_label for s in stages], order)
        self.stages = list(stages)
        self.evaluate_each_stage, self.output_dir, self.log_layers = (
            evaluate_each_stage,
            output_dir,
            log_layers,
        )
        self.results: list[StageResult] = []
        self.dense_evaluation: dict[str, float] = {}

    @property
    def order(self) -> str:
        """The compression order, e.g. ``"magnitude>rtn"``."""
        return ">".join(stage.display_label for stage in self.stages)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stages=[s.state_key for s in self.stages])

    def _fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._applied:
            return
        self._applied = True
        self.start_summary = compression_summary(pl_module, self.stages[0].b_orig)
        if self.evaluate_each_stage:
            loader = evaluation_dataloader(trainer)
            self.dense_evaluation = evaluate_module(pl_module, loader)
            log_metrics(
                trainer, {f"stage/0_dense/{k}": v for k, v in self.dense_evaluation.items()}
            )
        for index, stage in enumerate(self.stages, start=1):
            if stage.already_applied(pl_module):
                rank_zero_info(f"[ppq] {stage.state_key} is already applied; skipped.")
                continue
            result = stage.apply(pl_module, trainer, index=index)
            if self.evaluate_each_stage:
                result.evaluation = evaluate_module(pl_module, loader)
            self.results.append(result)
            log_metrics(trainer, result.metrics(self.log_layers))
            log_layer_table(trainer, result)
        self._report(trainer)

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
                    "stage": f"{r.index}_{r.label}",
                    "kind": r.kind,
                    **r.summary.as_dict(),
                    "seconds": r.seconds,
                    **r.evaluation,
                }
            )
        return rows

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        rows = self.rows()
        if not rows:
            return
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(folder / "schedule.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (folder / "schedule.json").write_text(
            json.dumps(
                {
                    "order": self.order,
                    "stages": rows,
                    "layers": {f"{r.index}_{r.label}": r.layers for r in self.results},
                },
                indent=2,
            )
        )
        shown = [
            c
            for c in (
                "stage",
                "kind",
                "sparsity",
                "avg_bits",
                "nominal_C",
                "measured_C",
                "ppl",
                "loss",
                "seconds",
            )
            if c in columns
        ]
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
