"""Order studies: which order of compression stages is best, measured or predicted.

For a model, evaluation data and a set of named stages, :class:`OrderStudy` evaluates

(a) the dense model and each stage alone,
(b) the quantization-only curve that the Compression Equivalence Ratio needs (given as
    stages, e.g. ``RTNQuantization.curve()``: RTN at 8 ... 2 bits, per channel),
(c) every permutation of the stages (``search="exhaustive"``) or only the order the Progressive
    Intensity Hypothesis predicts from (a) (``search="pih"``: weaker stage first),

and reports the best order, the PIH prediction and whether it matched, the performance gap ``G``,
the order advantage ``A`` and ``C*_P - C_Q`` for two-stage studies, and the budget spent.

Every evaluated order is a *cell* (``ppq_lightning.study.cells``), saved as soon as it is
measured: a restarted study (or another study sharing the folder) recomputes none of them.
Orders are applied depth first over their common prefixes: a compressed prefix is computed
once and copied for each continuation (``reuse_prefixes=True``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from ppq_lightning.compressed.history import StageKind
from ppq_lightning.errors import (
    PPQConfigError,
    bad_value,
    check_bool,
    check_choice,
    check_folder,
    check_int,
)
from ppq_lightning.order.evaluation import metric_direction
from ppq_lightning.order.grammar import all_orders, check_stage_names, format_order, parse_order
from ppq_lightning.order.interference import interference_ranking
from ppq_lightning.order.pairwise import pairwise_preferences, pairwise_ranking
from ppq_lightning.order.prediction import (
    PREDICTORS,
    Ranking,
    pih_cer_ranking,
    pih_order,
    pih_ranking,
    prune_first_ranking,
)
from ppq_lightning.order.stage import Stage
from ppq_lightning.study.assemble import best_orders, equivalence_ratios, pair_metrics
from ppq_lightning.study.cells import Cell, CellCache
from ppq_lightning.study.measure import CellMeasurer
from ppq_lightning.study.result import Budget, StudyResult

SEARCH_MODES = ("exhaustive", "pih", "predict")


class OrderStudy:
    """Measure (or predict) the best order of a set of compression stages on one model.

    Args:
        module: the dense LightningModule; never modified (every order runs on a copy).
        datamodule: gives ``val_dataloader()`` (evaluation) and, for calibrated stages,
            ``calibration_dataloader()`` (else the validation data calibrates).
        stages: the stages (:class:`~ppq_lightning.order.stage.Stage`, e.g. compression
            callbacks), each with a distinct ``name`` (its name in orders), e.g.
            ``[SparseGPT(sparsity=0.5, name="P"), GPTQ(bits=4, name="Q")]``.
        search: ``"exhaustive"`` (every permutation), ``"pih"`` (only the order the
            Progressive Intensity Hypothesis predicts from the single-stage results), or
            ``"predict"`` (rank every order with ``predictor``, evaluate only its ``top_k``).
        predictor: with ``search="predict"``: ``"calibration_kl"`` (each order's output KL
            from the dense model's on the calibration batches; the default, the most accurate
            on the committed grids), ``"interference"`` (layer output error of each order on
            the dense model's calibration inputs, no forward of a candidate), ``"pih"``,
            ``"pih_cer"`` (needs ``curve``), ``"prune_first"``
            (``ppq_lightning.order.prediction``) or ``"pairwise_kl"`` (the ``calibration_kl``
            ranking of every pair of stages alone, combined into a ranking of every order:
            ``order.pairwise``; ``n(n-1)/2`` two-stage predictions instead of ``n!`` orders).
        top_k: how many of the predicted orders ``search="predict"`` evaluates.
        order: evaluate only the dense model and this order (e.g. ``"Q>P"``; a sweep point):
            no single stages, no curve, no search.
        curve: quantization-only stages for ``C*``, from mildest to strongest, e.g.
            ``RTNQuantization.curve()`` (per-channel RTN at 8, 6, 5, 4, 3, 2 bits, what
            ``ppq study`` uses); empty (the default): no curve and no ``C*``.
        metric: the key of the evaluation dict to compare; None: the module's ``metric_name``
            (``"ppl"`` for ``CausalLMModule``, ``"acc"`` for ``ImageClassifierModule``), else
            ``"loss"`` (a module evaluated through its ``validation_step``).
        higher_is_better: whether a larger value is better; None: the module's
            ``higher_is_better`` (False for perplexity or loss: then ``M = -value``).
        output_dir: where cells and reports go; reusing it resumes a study.
        cells_dir: where cells go instead of ``output_dir/cells`` (shared by sweep points).
        reuse_prefixes: apply shared prefixes once (False: every order from the dense model).
        label: the study's name in reports (default: its stages' state keys, shortened).
        logger: a Lightning logger (``WandbLogger``, ``CSVLogger``, ...) that receives every
            cell's metrics as it is measured: ``study/<label>/<order>/<metric>``.
        tail: stages applied after every cell's order, before its evaluation (the dense model
            and single stages included), e.g. ``[BatchNormRecalibration(name="B")]``: the same
            study with BatchNorm re-estimated after compression. They are part of each cell's
            key, so cells with and without a tail never mix.
        forward_fn: how to call ``module`` on a calibration batch, ``forward_fn(module,
            batch)``, for a model whose batches ``calibration.data.batch_input`` cannot read:
            given to every stage that has none and to the predictors that run the model
            (``interference``, ``calibration_kl``).

    Raises:
        PPQConfigError: on no stages, unnamed or repeated names, a ``datamodule`` without
            ``val_dataloader()``, a bad ``search``,
            ``predictor`` or ``top_k``, a non-bool ``reuse_prefixes``/``higher_is_better``,
            a ``metric``/``label``/``order`` that is not a non-empty string, an
            ``output_dir``/``cells_dir`` that is (or lies in) a file, or an evaluation that
            lacks ``metric``.

    Example (YAML, for ``ppq study --config``)::

        model: {class_path: ppq_lightning.models.CausalLMModule, init_args: {model: smollm2-135m}}
        data: {class_path: ppq_lightning.datamodules.TextDataModule, init_args: {source: pydoc}}
        search: exhaustive
        stages:
          - {class_path: ppq_lightning.callbacks.SparseGPT, init_args: {name: P, sparsity: 0.5}}
          - {class_path: ppq_lightning.callbacks.GPTQ, init_args: {name: Q, bits: 4}}
    """

    def __init__(
        self,
        module: L.LightningModule,
        datamodule: L.LightningDataModule,
        stages: Sequence[Stage],
        search: str = "exhaustive",
        order: str | None = None,
        curve: Sequence[Stage] = (),
        metric: str | None = None,
        higher_is_better: bool | None = None,
        output_dir: str | Path = "outputs/study",
        cells_dir: str | Path | None = None,
        reuse_prefixes: bool = True,
        label: str | None = None,
        logger: Any | None = None,
        tail: Sequence[Stage] = (),
        predictor: str = "calibration_kl",
        top_k: int = 1,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise PPQConfigError(
                f"stages={stages!r} is not allowed: expected a non-empty list of compression "
                "callbacks, each with a distinct `name`."
            )
        names = [s.name for s in stages]
        check_stage_names(names)
        clash = sorted({s.name for s in tail} & {*names, *(s.name for s in curve)})
        if clash:
            raise PPQConfigError(f"a tail stage and a study or curve stage are named {clash[0]!r}.")
        if not callable(getattr(datamodule, "val_dataloader", None)):
            raise bad_value(
                "datamodule",
                datamodule,
                "a LightningDataModule with val_dataloader() (from your datasets: "
                "L.LightningDataModule.from_datasets(train_dataset=..., val_dataset=...))",
            )
        check_choice("search", search, SEARCH_MODES)
        check_choice("predictor", predictor, PREDICTORS)
        check_int("top_k", top_k, minimum=1)
        check_bool("reuse_prefixes", reuse_prefixes)
        if higher_is_better is not None:
            check_bool("higher_is_better", higher_is_better)
        for argument, value in (("metric", metric), ("label", label), ("order", order)):
            if value is not None and (not isinstance(value, str) or not value):
                raise bad_value(argument, value, "a non-empty string or None")
        if predictor == "pih_cer" and search == "predict" and not curve:
            raise PPQConfigError(
                "predictor='pih_cer' ranks stages by C*, which needs a quantization curve "
                "(curve=RTNQuantization.curve(), or curve_bits in ppq study)."
            )
        self.predictor, self.top_k = predictor, top_k
        self.forward_fn = forward_fn
        if metric is None:
            metric = getattr(module, "metric_name", "loss")
        reported = getattr(module, "metric_names", None)
        names_reported = reported() if callable(reported) else None
        if names_reported is not None and metric not in names_reported:
            raise bad_value("metric", metric, f"one of {', '.join(sorted(names_reported))}")
        if higher_is_better is None:
            higher_is_better = metric_direction(module, metric)
        self.module, self.datamodule = module, datamodule
        self.stages = {s.name: s for s in stages}
        self.curve, self.tail = list(curve), list(tail)
        self.search, self.metric, self.higher_is_better = search, metric, higher_is_better
        self.output_dir = check_folder("output_dir", output_dir)
        self.cells_dir = check_folder(
            "cells_dir", cells_dir if cells_dir is not None else self.output_dir / "cells"
        )
        self.order = parse_order(order, names) if order is not None else None
        self.label = label or "_".join(names)
        self.cells = CellMeasurer(
            module,
            datamodule,
            metric,
            higher_is_better,
            self.cells_dir,
            stages[0].b_orig,
            self.tail,
            forward_fn,
            reuse_prefixes,
            self.label,
            logger,
        )

    # -- the cells (study.measure) ----------------------------------------------------------
    @property
    def budget(self) -> Budget:
        """What the study spent: evaluations, cached cells, stage applications."""
        return self.cells.budget

    @property
    def cache(self) -> CellCache:
        """The study's cells (keyed by the fingerprint of its model, data, metric, b_orig)."""
        return self.cells.cache

    @property
    def fingerprint(self) -> str:
        """What a cell's value depends on besides its stages (see ``study.cells.fingerprint``)."""
        return self.cells.cache.fingerprint

    def measure(
        self, requests: dict[tuple[str, ...], str], stages: dict[str, Stage]
    ) -> dict[tuple[str, ...], Cell]:
        """Evaluate every requested order (see ``study.measure.CellMeasurer.measure``)."""
        return self.cells.measure(requests, stages)

    def study_key(self) -> str:
        """What identifies the study's row in a report folder: the fingerprint of its model,
        data and metric, the metric's direction, its search (with the order, or the predictor
        and ``top_k``), and the names and identities of its stages, curve and tail; never its
        label. Running the same study again gives the same key (its row is replaced)."""
        search = "order" if self.order is not None else self.search
        parts = {
            "fingerprint": self.fingerprint,
            "higher_is_better": self.higher_is_better,
            "search": search,
            "order": list(self.order) if self.order is not None else None,
            "predictor": [self.predictor, self.top_k] if search == "predict" else None,
            "stages": [[name, stage.identity] for name, stage in self.stages.items()],
            "curve": [[s.name, s.identity] for s in self.curve] if search != "order" else [],
            "tail": [stage.identity for stage in self.tail],
        }
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]

    # -- the study ------------------------------------------------------------------------------
    def run(self) -> StudyResult:
        """Run the study (resuming from ``output_dir``) and return its result."""
        names = list(self.stages)
        curve = {s.name: s for s in self.curve}
        clash = sorted(set(curve) & set(names))
        if clash:
            raise PPQConfigError(f"a curve stage and a study stage are both named {clash[0]!r}.")
        all_stages = {**self.stages, **curve}
        requests: dict[tuple[str, ...], str] = {(): "dense"}
        if self.order is not None:  # one order only (a sweep point)
            cells = self.measure({**requests, self.order: "order"}, all_stages)
            order = format_order(self.order)
            return StudyResult(
                label=self.label,
                stages=names,
                search="order",
                metric=self.metric,
                dense=cells[()],
                singles={},
                curve=[],
                orders={order: cells[self.order]},
                best_order=order,
                pih_order="",
                pih_correct=None,
                cer={},
                budget=self.budget,
                kinds=self._kinds(),
                key=self.study_key(),
            )
        if self.search == "predict":
            return self._predict(names, curve, all_stages)
        requests.update({(n,): "single" for n in names})
        requests.update({(n,): "curve" for n in curve})
        exhaustive = self.search == "exhaustive" and len(names) > 1
        if exhaustive:  # one depth-first pass: every order reuses its single-stage prefix
            requests.update({o: "order" for o in all_orders(names)})
        cells = self.measure(requests, all_stages)
        singles = {n: cells[(n,)] for n in names}
        predicted = tuple(pih_order({n: c.M for n, c in singles.items()}))
        if exhaustive:
            wanted = all_orders(names)
        else:  # PIH: the predicted order only, known once the singles are measured
            wanted = [predicted]
            cells.update(
                self.measure({predicted: "order" if len(names) > 1 else "single"}, all_stages)
            )
        orders = {format_order(o): cells[o] for o in wanted}
        best = best_orders(orders)
        pih = format_order(predicted)
        curve_cells = [cells[(n,)] for n in curve]
        dense = cells[()]
        cer = equivalence_ratios(dense, curve_cells, singles)
        return StudyResult(
            label=self.label,
            stages=names,
            search=self.search,
            metric=self.metric,
            dense=dense,
            singles=singles,
            curve=curve_cells,
            orders=orders,
            best_order=best,
            pih_order=pih,
            pih_correct=(pih in best.split("=")) if self.search == "exhaustive" else None,
            cer=cer,
            budget=self.budget,
            kinds=self._kinds(),
            pair=pair_metrics(names, self._kinds(), singles, orders, cer),
            key=self.study_key(),
        )

    def rank(self, names: list[str], curve: dict[str, Stage]) -> tuple[Ranking, dict]:
        """The predictor's ranking of every order, and the cells it measured (singles, curve)."""
        kinds = self._kinds()
        if self.predictor == "prune_first":
            return prune_first_ranking(kinds), {}
        if self.predictor == "pairwise_kl":  # n(n-1)/2 two-stage rankings, not n! orders
            by_name = {stage.name: stage for stage in self.stages.values()}

            def predict_pair(a: str, b: str) -> Ranking:
                return interference_ranking(
                    self.module,
                    [by_name[a], by_name[b]],
                    self.cells.calibration_data(),
                    self.cells.apply,
                    score="calibration_kl",
                    tail=self.tail,
                    forward=self.forward_fn,
                )

            preferences, cost = pairwise_preferences(names, predict_pair)
            return pairwise_ranking(self.predictor, names, preferences, cost), {}
        if self.predictor in ("interference", "calibration_kl"):
            ranking = interference_ranking(
                self.module,
                list(self.stages.values()),
                self.cells.calibration_data(),
                self.cells.apply,
                score=self.predictor,
                tail=self.tail,
                forward=self.forward_fn,
            )
            return ranking, {}
        requests = {(): "dense", **{(n,): "single" for n in names}}
        if self.predictor == "pih_cer":
            requests.update({(n,): "curve" for n in curve})
        cells = self.measure(requests, {**self.stages, **curve})
        singles = {n: cells[(n,)] for n in names}
        if self.predictor == "pih":
            return pih_ranking({n: c.M for n, c in singles.items()}), cells
        cer = equivalence_ratios(cells[()], [cells[(n,)] for n in curve], singles)
        return pih_cer_ranking(cer, len(curve)), cells

    def _predict(
        self, names: list[str], curve: dict[str, Stage], all_stages: dict[str, Stage]
    ) -> StudyResult:
        """``search="predict"``: rank every order, evaluate the dense model and the top ``k``."""
        ranking, cells = self.rank(names, curve)
        wanted = ranking.top_k(self.top_k)
        kind = "order" if len(names) > 1 else "single"
        cells.update(self.measure({(): "dense", **{o: kind for o in wanted}}, all_stages))
        orders = {format_order(o): cells[o] for o in wanted}
        best = best_orders(orders)
        singles = {n: cells[(n,)] for n in names if (n,) in cells}
        curve_cells = [cells[(n,)] for n in curve if (n,) in cells]
        return StudyResult(
            label=self.label,
            stages=names,
            search="predict",
            metric=self.metric,
            dense=cells[()],
            singles=singles,
            curve=curve_cells,
            orders=orders,
            best_order=best,
            pih_order="",
            pih_correct=None,
            cer=equivalence_ratios(cells[()], curve_cells, singles)
            if len(singles) == len(names)
            else {},
            budget=self.budget,
            kinds=self._kinds(),
            prediction=ranking.as_dict(),
            key=self.study_key(),
        )

    def _kinds(self) -> dict[str, str]:
        return {n: str(StageKind(s.kind)) for n, s in self.stages.items()}
