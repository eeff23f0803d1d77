"""Measuring cells: apply an order's stages to a copy of the model, evaluate it, keep the cell.

:class:`CellMeasurer` is the part of an order study that touches the model and the cell cache;
the study's search strategies (``study.engine.OrderStudy``) say which orders to measure and the
result assembly (``study.assemble``) turns cells into G, A and C*.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.offload import copy_model
from ppq_lightning.order.evaluation import evaluate_module
from ppq_lightning.order.grammar import format_order
from ppq_lightning.order.metrics import metric_value
from ppq_lightning.order.stage import Stage
from ppq_lightning.order.walk import walk_orders
from ppq_lightning.study.cells import Cell, CellCache, fingerprint
from ppq_lightning.study.result import Budget


class CellMeasurer:
    """Evaluates orders of stages on copies of one dense model, through a cell cache.

    Args:
        module: the dense LightningModule (never modified).
        datamodule: ``val_dataloader()`` evaluates, ``calibration_dataloader()`` (else the
            validation data) calibrates.
        metric: the evaluated metric compared across cells; ``higher_is_better`` its direction.
        cells_dir: where cells are kept.
        b_orig: bits of an original weight, for the cells' compression rates.
        tail: stages applied after every order before its evaluation (part of each cell's key).
        forward_fn: given to every stage that has none (``forward_fn(model, batch)``).
        reuse_prefixes: apply shared prefixes once (``order.walk.walk_orders``).
        label, logger: every new cell's metrics go to ``logger`` as
            ``study/<label>/<order>/<metric>``.
    """

    def __init__(
        self,
        module: L.LightningModule,
        datamodule: L.LightningDataModule,
        metric: str,
        higher_is_better: bool,
        cells_dir: Path,
        b_orig: int,
        tail: Sequence[Stage] = (),
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        reuse_prefixes: bool = True,
        label: str = "study",
        logger: Any | None = None,
    ) -> None:
        self.module, self.datamodule = module, datamodule
        self.metric, self.higher_is_better = metric, higher_is_better
        self.cells_dir, self.b_orig, self.tail = cells_dir, b_orig, list(tail)
        self.forward_fn, self.reuse_prefixes = forward_fn, reuse_prefixes
        self.label, self.logger = label, logger
        self.budget = Budget()
        self._cache: CellCache | None = None
        self._evaluation: list[Any] | None = None
        self._calibration: list[Any] | None = None

    # -- data and cache -----------------------------------------------------------------------
    @property
    def cache(self) -> CellCache:
        """The cells, keyed by the fingerprint of the model, data, metric and ``b_orig``."""
        if self._cache is None:
            batches = [*self.evaluation_data(), *self.calibration_data()]
            signature = getattr(self.module, "evaluation_signature", None)
            settings = signature() if callable(signature) else ""
            key = self.metric + (f"|{settings}" if settings else "") + f"|b_orig={self.b_orig}"
            self._cache = CellCache(self.cells_dir, fingerprint(self.module, batches, key))
        return self._cache

    def evaluation_data(self) -> list[Any]:
        if self._evaluation is None:
            self._evaluation = list(self.datamodule.val_dataloader())
        return self._evaluation

    def calibration_data(self) -> list[Any]:
        if self._calibration is None:
            get = getattr(self.datamodule, "calibration_dataloader", None)
            loader = get() if callable(get) else self.datamodule.val_dataloader()
            self._calibration = list(loader)
        return self._calibration

    def cached(self, keys: tuple[str, ...]) -> Cell | None:
        """The cell of ``keys`` if measured (counted in the budget when read from disk)."""
        cell, from_disk = self.cache.get(keys)
        self.budget.cached += from_disk
        return cell

    # -- one stage, one cell ------------------------------------------------------------------
    def apply(self, model: L.LightningModule, stage: Stage) -> None:
        """Apply a copy of ``stage`` to ``model`` (with the study's ``forward_fn`` if it has
        none), on the calibration data."""
        stage = copy.deepcopy(stage)
        if self.forward_fn is not None and getattr(stage, "forward_fn", None) is None:
            stage.forward_fn = self.forward_fn
        stage.apply(model, dataloader=self.calibration_data())
        self.budget.applications += 1

    def evaluate(
        self,
        model: L.LightningModule,
        names: tuple[str, ...],
        kind: str,
        keys: tuple[str, ...],
        seconds: float,
    ) -> Cell:
        """Check the invariants, evaluate ``model``, keep and log its cell."""
        start = time.perf_counter()
        check_invariants(model)
        results = evaluate_module(model, self.evaluation_data())
        evaluated = time.perf_counter() - start
        if self.metric not in results:
            raise PPQConfigError(
                f"metric={self.metric!r} is not among the evaluated metrics {sorted(results)}."
            )
        summary = compression_summary(model, self.b_orig)
        value = float(results[self.metric])
        cell = Cell(
            order=format_order(names),
            kind=kind,
            keys=keys,
            value=value,
            M=metric_value(value, self.higher_is_better),
            nominal_C=summary.nominal_C,
            measured_C=summary.measured_C,
            sparsity=summary.sparsity,
            avg_bits=summary.avg_bits,
            seconds=seconds + time.perf_counter() - start,
            eval_seconds=evaluated,
            metrics=results,
        )
        self.cache.put(cell)
        self.budget.evaluations += 1
        self.budget.applications_without_reuse += len(keys)
        if self.logger is not None:
            prefix = f"study/{self.label}/{cell.order}"
            self.logger.log_metrics(
                {
                    **{f"{prefix}/{k}": v for k, v in results.items()},
                    f"{prefix}/measured_C": cell.measured_C,
                    f"{prefix}/nominal_C": cell.nominal_C,
                },
                step=self.budget.evaluations + self.budget.cached,
            )
        return cell

    def finish(
        self,
        model: L.LightningModule,
        names: tuple[str, ...],
        kind: str,
        keys: tuple[str, ...],
        seconds: float,
    ) -> Cell:
        """Evaluate the model after ``names``, on a copy with the ``tail`` stages applied when
        there are any (the prefix itself goes on to the orders below it)."""
        if self.tail:
            start = time.perf_counter()
            model = copy_model(model)
            for stage in self.tail:
                self.apply(model, stage)
            seconds += time.perf_counter() - start
            names = (*names, *(stage.name for stage in self.tail))
        return self.evaluate(model, names, kind, keys, seconds)

    # -- many cells -----------------------------------------------------------------------------
    def measure(
        self, requests: dict[tuple[str, ...], str], stages: dict[str, Stage]
    ) -> dict[tuple[str, ...], Cell]:
        """Evaluate every requested order (names -> kind), depth first over shared prefixes.

        Cells are keyed by the stages' identities, not their names: cached cells are read
        back, not recomputed, and two requested orders of the same identities (a study stage
        and a curve stage with one configuration) are computed once. A prefix is applied only
        when some order below it still needs computing.
        """
        key_of = {name: stage.identity for name, stage in stages.items()}
        tail = tuple(stage.identity for stage in self.tail)
        keys = {names: (*(key_of[n] for n in names), *tail) for names in requests}
        first: dict[tuple[str, ...], tuple[str, ...]] = {}  # one order per distinct keys
        for names in sorted(requests, key=lambda n: (len(n), n)):
            first.setdefault(keys[names], names)
        todo = {n for n in first.values() if self.cached(keys[n]) is None}
        progress = tqdm(total=len(todo), desc=f"study {self.label}", unit="cell", leave=False)

        def visit(model: L.LightningModule, prefix: tuple[str, ...], seconds: float) -> None:
            self.finish(model, prefix, requests[prefix], keys[prefix], seconds)
            progress.update()

        with torch.no_grad():
            if self.reuse_prefixes and todo:
                walk_orders(self.module, todo, lambda m, n: self.apply(m, stages[n]), visit)
            elif todo:
                for names in sorted(todo, key=len):
                    model = copy_model(self.module)
                    start = time.perf_counter()
                    for name in names:
                        self.apply(model, stages[name])
                    self.finish(
                        model, names, requests[names], keys[names], time.perf_counter() - start
                    )
                    progress.update()
        progress.close()
        return {  # a cell shared by names is reported under the names asked for
            names: dataclasses.replace(
                self.cached(keys[names]), order=format_order(names), kind=requests[names]
            )
            for names in requests
        }
