"""Order studies: which order of compression stages is best, measured or predicted.

For a model, evaluation data and a set of named stages, :class:`OrderStudy` evaluates

(a) the dense model and each stage alone,
(b) the quantization-only curve that the Compression Equivalence Ratio needs (RTN at 8 ... 2
    bits, per channel, by default),
(c) every permutation of the stages (``search="exhaustive"``) or only the order the Progressive
    Intensity Hypothesis predicts from (a) (``search="pih"``: weaker stage first),

and reports the best order, the PIH prediction and whether it matched, the performance gap ``G``,
the order advantage ``A`` and ``C*_P - C_Q`` for two-stage studies, and the budget spent.

Every evaluated order is a *cell*, saved to ``output_dir/cells/`` as soon as it is measured and
keyed by the stages' state keys: a restarted study (or another study sharing the folder, e.g.
the points of a grid that share the dense model, the curve and single stages) recomputes none of
them. Orders are applied depth first over their common prefixes: a compressed prefix is computed
once and copied for each continuation (``reuse_prefixes=True``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tqdm.auto import tqdm

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.evaluation import evaluate_module
from ppq_lightning.metrics import (
    compression_equivalence_ratio,
    compression_summary,
    metric_value,
    nominal_compression_rate,
    order_advantage,
    performance_gap,
    pih_order,
)
from ppq_lightning.order import all_orders, check_stage_names, format_order, parse_order
from ppq_lightning.state import check_invariants

SEARCH_MODES = ("exhaustive", "pih")
DEFAULT_CURVE_BITS = (8, 6, 5, 4, 3, 2)


@dataclass(frozen=True)
class Cell:
    """One evaluated order: the model after ``order`` (``"dense"`` for no stage).

    Attributes:
        order: stage names joined by ``>``.
        kind: ``"dense"``, ``"single"``, ``"curve"`` (a quantization-only point) or ``"order"``.
        keys: the state keys of the stages, in order (what identifies the cell on disk).
        value: the evaluated metric as logged (e.g. perplexity).
        M: the higher-is-better metric (``-ppl`` for perplexity).
        nominal_C, measured_C, sparsity, avg_bits: from ``compression_summary``.
        seconds: compression and evaluation wall time when it was computed.
    """

    order: str
    kind: str
    keys: tuple[str, ...]
    value: float
    M: float
    nominal_C: float
    measured_C: float
    sparsity: float
    avg_bits: float
    seconds: float


@dataclass
class Budget:
    """What a study cost: evaluations and stage applications, with and without prefix reuse.

    Attributes:
        evaluations: cells evaluated in this run (cached cells cost nothing).
        cached: cells read back from ``output_dir/cells``.
        applications: stages applied in this run.
        applications_without_reuse: stages a study without prefix reuse would have applied for
            the same evaluated cells (the sum of their lengths).
    """

    evaluations: int = 0
    cached: int = 0
    applications: int = 0
    applications_without_reuse: int = 0


@dataclass
class StudyResult:
    """The outcome of one :class:`OrderStudy` run (one set of stages).

    ``best_order`` is the order with the highest ``M``; orders tied exactly are all named,
    joined by ``=`` (``"P>Q=Q>P"``), and the PIH prediction is right if it is one of them.
    """

    label: str
    stages: list[str]
    search: str
    metric: str
    dense: Cell
    singles: dict[str, Cell]
    curve: list[Cell]
    orders: dict[str, Cell]
    best_order: str
    pih_order: str
    pih_correct: bool | None
    cer: dict[str, float]
    budget: Budget
    kinds: dict[str, str] = field(default_factory=dict)
    pair: dict[str, float] = field(default_factory=dict)

    def summary_row(self) -> dict[str, Any]:
        """One flat row for the study table (CSV/Markdown)."""
        best = self.orders[self.best_order.split("=")[0]]
        row: dict[str, Any] = {
            "study": self.label,
            "stages": ",".join(self.stages),
            "search": self.search,
            "best_order": self.best_order,
            self.metric: best.value,
            "nominal_C": best.nominal_C,
            "measured_C": best.measured_C,
            "dense": self.dense.value,
        }
        row.update({f"alone[{name}]": cell.value for name, cell in self.singles.items()})
        row.update({f"order[{name}]": cell.value for name, cell in self.orders.items()})
        row.update({f"C*[{name}]": value for name, value in self.cer.items()})
        row.update(self.pair)
        row.update(
            pih_order=self.pih_order,
            pih_correct=self.pih_correct,
            evaluations=self.budget.evaluations,
            cached=self.budget.cached,
            applications=self.budget.applications,
            applications_without_reuse=self.budget.applications_without_reuse,
        )
        return row

    def cells(self) -> list[Cell]:
        return [self.dense, *self.singles.values(), *self.curve, *self.orders.values()]


def default_curve(bits: Iterable[int] = DEFAULT_CURVE_BITS) -> list[CompressionCallback]:
    """Per-channel asymmetric RTN at each bit width: the quantization-only curve for ``C*``."""
    from ppq_lightning.callbacks import RTNQuantization

    return [RTNQuantization(bits=b, name=f"RTN{b}", log_layers=False) for b in bits]


class OrderStudy:
    """Measure (or predict) the best order of a set of compression stages on one model.

    Args:
        module: the dense LightningModule; never modified (every order runs on a copy).
        datamodule: gives ``val_dataloader()`` (evaluation) and, for calibrated stages,
            ``calibration_dataloader()`` (else the validation data calibrates).
        stages: the stages, each with a distinct ``name`` (its name in orders), e.g.
            ``[SparseGPT(sparsity=0.5, name="P"), GPTQ(bits=4, name="Q")]``.
        search: ``"exhaustive"`` (every permutation) or ``"pih"`` (only the order the
            Progressive Intensity Hypothesis predicts from the single-stage results).
        order: evaluate only the dense model and this order (e.g. ``"Q>P"``; a sweep point):
            no single stages, no curve, no search.
        curve: quantization-only stages for ``C*`` (default RTN 8, 6, 5, 4, 3, 2 bits per
            channel); ``[]`` skips the curve.
        metric: the key of the evaluation dict to compare (``"ppl"`` for ``CausalLMModule``,
            ``"loss"`` for a module evaluated through its ``validation_step``).
        higher_is_better: False for perplexity or loss (then ``M = -value``).
        output_dir: where cells and reports go; reusing it resumes a study.
        cells_dir: where cells go instead of ``output_dir/cells`` (shared by sweep points).
        reuse_prefixes: apply shared prefixes once (False: every order from the dense model).
        label: the study's name in reports (default: its stages' state keys, shortened).
        logger: a Lightning logger (``WandbLogger``, ``CSVLogger``, ...) that receives every
            cell's metrics as it is measured: ``study/<label>/<order>/<metric>``.

    Raises:
        PPQConfigError: on no stages, unnamed or repeated names, a bad ``search``, or an
            evaluation that lacks ``metric``.

    Example (YAML, for ``ppq study --config``)::

        model: {class_path: ppq_lightning.lm.CausalLMModule, init_args: {model: smollm2-135m}}
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
        stages: Sequence[CompressionCallback],
        search: str = "exhaustive",
        order: str | None = None,
        curve: Sequence[CompressionCallback] | None = None,
        metric: str = "ppl",
        higher_is_better: bool = False,
        output_dir: str | Path = "outputs/study",
        cells_dir: str | Path | None = None,
        reuse_prefixes: bool = True,
        label: str | None = None,
        logger: Any | None = None,
    ) -> None:
        if not stages or not all(isinstance(s, CompressionCallback) for s in stages):
            raise PPQConfigError(
                f"stages={stages!r} is not allowed: expected a non-empty list of compression "
                "callbacks, each with a distinct `name`."
            )
        names = [s.display_label for s in stages]
        check_stage_names(names)
        if search not in SEARCH_MODES:
            raise PPQConfigError(
                f"search={search!r} is not allowed: expected one of {SEARCH_MODES}."
            )
        self.module, self.datamodule = module, datamodule
        self.stages = {s.display_label: s for s in stages}
        self.curve = list(default_curve() if curve is None else curve)
        self.search, self.metric, self.higher_is_better = search, metric, higher_is_better
        self.output_dir = Path(output_dir)
        self.cells_dir = Path(cells_dir) if cells_dir is not None else self.output_dir / "cells"
        self.order = parse_order(order, names) if order is not None else None
        self.reuse_prefixes, self.logger = reuse_prefixes, logger
        self.label = label or "_".join(names)
        self.budget = Budget()
        self._cells: dict[tuple[str, ...], Cell] = {}
        self._eval_loader: Any = None
        self._calibration: list[Any] | None = None
        self._fingerprint: str | None = None

    # -- the cells ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """What a cell's value depends on besides its stages: the dense weights, the evaluation
        and calibration data, and the metric. Cells of another model or data never match."""
        if self._fingerprint is None:
            digest = hashlib.sha1(self.metric.encode())
            with torch.no_grad():
                for name, tensor in self.module.state_dict().items():
                    if torch.is_tensor(tensor) and tensor.is_floating_point():
                        t = tensor.detach().double()
                        digest.update(
                            f"{name}{tuple(t.shape)}{t.sum():.10e}{t.abs().sum():.10e}".encode()
                        )
            for batch in [*self._evaluation_data(), *self._calibration_data()]:
                digest.update(_batch_bytes(batch))
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def _cell_path(self, keys: tuple[str, ...]) -> Path:
        digest = hashlib.sha1(json.dumps([self.fingerprint, *keys]).encode()).hexdigest()[:16]
        return self.cells_dir / f"{digest}.json"

    def _evaluation_data(self) -> Any:
        if self._eval_loader is None:
            self._eval_loader = list(self.datamodule.val_dataloader())
        return self._eval_loader

    def _cached(self, keys: tuple[str, ...]) -> Cell | None:
        if keys in self._cells:
            return self._cells[keys]
        path = self._cell_path(keys)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        cell = Cell(**{**data, "keys": tuple(data["keys"])})
        if cell.keys != keys:  # a hash collision: recompute rather than trust it
            return None
        self._cells[keys] = cell
        self.budget.cached += 1
        return cell

    def _evaluate(
        self,
        model: L.LightningModule,
        names: tuple[str, ...],
        kind: str,
        keys: tuple[str, ...],
        seconds: float,
    ) -> Cell:
        start = time.perf_counter()
        check_invariants(model)
        results = evaluate_module(model, self._evaluation_data())
        if self.metric not in results:
            raise PPQConfigError(
                f"metric={self.metric!r} is not among the evaluated metrics {sorted(results)}."
            )
        b_orig = next(iter(self.stages.values())).b_orig
        summary = compression_summary(model, b_orig)
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
        )
        path = self._cell_path(keys)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(cell), indent=2))
        tmp.replace(path)  # a cell is on disk whole or not at all
        self._cells[keys] = cell
        self.budget.evaluations += 1
        self.budget.applications_without_reuse += len(keys)
        if self.logger is not None:
            prefix = f"study/{self.label}/{cell.order}"
            self.logger.log_metrics(
                {
                    f"{prefix}/{self.metric}": value,
                    f"{prefix}/measured_C": cell.measured_C,
                    f"{prefix}/nominal_C": cell.nominal_C,
                },
                step=self.budget.evaluations + self.budget.cached,
            )
        return cell

    def _calibration_data(self) -> list[Any] | None:
        if self._calibration is None:
            get = getattr(self.datamodule, "calibration_dataloader", None)
            loader = get() if callable(get) else self.datamodule.val_dataloader()
            self._calibration = list(loader)
        return self._calibration

    def _apply(self, model: L.LightningModule, stage: CompressionCallback) -> None:
        copy.deepcopy(stage).apply(model, dataloader=self._calibration_data())
        self.budget.applications += 1

    def measure(
        self, requests: dict[tuple[str, ...], str], stages: dict[str, CompressionCallback]
    ) -> dict[tuple[str, ...], Cell]:
        """Evaluate every requested order (names -> kind), depth first over shared prefixes.

        Cached cells are read back, not recomputed; a prefix is applied only when some order
        below it still needs computing.
        """
        key_of = {name: stage.state_key for name, stage in stages.items()}
        keys = {names: tuple(key_of[n] for n in names) for names in requests}
        todo = {names for names in requests if self._cached(keys[names]) is None}
        progress = tqdm(total=len(todo), desc=f"study {self.label}", unit="cell", leave=False)

        def visit(model: L.LightningModule, prefix: tuple[str, ...], seconds: float) -> None:
            if prefix in todo:
                self._evaluate(model, prefix, requests[prefix], keys[prefix], seconds)
                progress.update()
            children = sorted(
                {
                    n[len(prefix)]
                    for n in todo
                    if len(n) > len(prefix) and n[: len(prefix)] == prefix
                }
            )
            for i, name in enumerate(children):
                last = i == len(children) - 1
                child = model if last and prefix else copy.deepcopy(model)
                start = time.perf_counter()
                self._apply(child, stages[name])
                visit(child, (*prefix, name), time.perf_counter() - start)

        with torch.no_grad():
            if self.reuse_prefixes and todo:
                visit(self.module, (), 0.0)
            elif todo:
                for names in sorted(todo, key=len):
                    model = copy.deepcopy(self.module)
                    start = time.perf_counter()
                    for name in names:
                        self._apply(model, stages[name])
                    self._evaluate(
                        model, names, requests[names], keys[names], time.perf_counter() - start
                    )
                    progress.update()
        progress.close()
        return {names: self._cached(keys[names]) for names in requests}

    # -- the study ------------------------------------------------------------------------------
    def run(self) -> StudyResult:
        """Run the study (resuming from ``output_dir``) and return its result."""
        names = list(self.stages)
        curve = {s.display_label: s for s in self.curve}
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
                kinds={n: s.kind for n, s in self.stages.items()},
            )
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
        best_m = max(c.M for c in orders.values())
        tied = [o for o, c in orders.items() if best_m == c.M]  # equal metrics: every one is best
        best = "=".join(tied)
        pih = format_order(predicted)
        curve_cells = [cells[(n,)] for n in curve]
        dense = cells[()]
        cer = {}
        if curve_cells:
            points = [(1.0, dense.M)] + [
                (nominal_compression_rate(0.0, c.avg_bits, round(dense.avg_bits)), c.M)
                for c in curve_cells
            ]
            cer = {n: compression_equivalence_ratio(points, c.M) for n, c in singles.items()}
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
            pih_correct=(pih in tied) if self.search == "exhaustive" else None,
            cer=cer,
            budget=self.budget,
            kinds={n: s.kind for n, s in self.stages.items()},
            pair=self._pair_metrics(names, singles, orders, cer),
        )

    def _pair_metrics(self, names, singles, orders, cer) -> dict[str, float]:
        """G, A and C*_P - C_Q for a two-stage exhaustive study (first stage named first)."""
        if len(names) != 2 or len(orders) != 2:
            return {}
        f1, f2 = names
        pair = {
            "G": performance_gap(singles[f1].M, singles[f2].M),
            "A": order_advantage(orders[f"{f1}>{f2}"].M, orders[f"{f2}>{f1}"].M),
        }
        kinds = {n: self.stages[n].kind for n in names}
        p = next((n for n in names if kinds[n] == "P"), None)
        q = next((n for n in names if kinds[n] == "Q"), None)
        if p and q and cer:
            pair["C*_P - C_Q"] = cer[p] - singles[q].nominal_C
        return pair


def _batch_bytes(batch: Any) -> bytes:
    """The bytes of every tensor in a batch (tensor, dict, list or tuple), for fingerprints."""
    if torch.is_tensor(batch):
        return batch.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(batch, dict):
        return b"".join(k.encode() + _batch_bytes(v) for k, v in sorted(batch.items()))
    if isinstance(batch, (list, tuple)):
        return b"".join(_batch_bytes(v) for v in batch)
    return repr(batch).encode()


def write_report(results: Sequence[StudyResult], folder: str | Path) -> Path:
    """Write the table of studies and their cells (CSV, JSON, Markdown) and the plots.

    Files: ``studies.csv``, ``studies.md``, ``cells.csv``, ``report.json``, and with two-stage
    studies ``advantage_vs_gap.png``, ``advantage_vs_cer.png``, plus ``heatmap.png`` (the metric
    of every order in every study).
    """
    import csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r.summary_row() for r in results]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "studies.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    cells = [
        {"study": r.label, **asdict(c), "keys": ">".join(c.keys)}
        for r in results
        for c in r.cells()
    ]
    with open(folder / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    (folder / "report.json").write_text(
        json.dumps(
            {"studies": rows, "cells": cells, "pih_hits": _pih_hits(results)},
            indent=2,
            default=str,
        )
    )
    (folder / "studies.md").write_text(markdown_table(rows, columns) + "\n")
    plot_report(results, folder)
    return folder


def _pih_hits(results: Sequence[StudyResult]) -> dict[str, int]:
    judged = [r for r in results if r.pih_correct is not None]
    return {"studies": len(judged), "pih_correct": sum(bool(r.pih_correct) for r in judged)}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table (floats to 4 significant digits)."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_report(results: Sequence[StudyResult], folder: Path) -> list[Path]:
    """A against G, A against ``C*_P - C_Q`` (two-stage studies), and a heatmap of the metric
    by order pattern (rows) and study (columns). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pairs = [r for r in results if "A" in r.pair]
    for key, name, xlabel in (
        ("G", "advantage_vs_gap.png", "G(f1, f2) = M(f1) - M(f2)"),
        ("C*_P - C_Q", "advantage_vs_cer.png", "C*_P - C_Q"),
    ):
        points = [(r.pair[key], r.pair["A"], r.label) for r in pairs if key in r.pair]
        if not points:
            continue
        finite = [x for x, _, _ in points if math.isfinite(x)]
        edge = max(finite, default=0.0) + 1.0  # where C* beyond the curve is drawn
        fig, ax = plt.subplots(figsize=(5, 4))
        for x, y, label in points:
            beyond = not math.isfinite(x)
            ax.scatter([edge if beyond else x], [y], marker=">" if beyond else "o", color="C0")
            ax.annotate(
                label + (" (C* beyond curve)" if beyond else ""),
                (edge if beyond else x, y),
                fontsize=6,
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("A(f1 -> f2)")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)
    patterns = sorted({_pattern(r, o) for r in results for o in r.orders})
    if results and patterns:
        grid = torch.full((len(patterns), len(results)), float("nan"))
        for j, r in enumerate(results):
            for o, cell in r.orders.items():
                grid[patterns.index(_pattern(r, o)), j] = cell.value
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(results) + 2), 0.5 * len(patterns) + 2))
        image = ax.imshow(torch.log10(grid).numpy(), aspect="auto", cmap="viridis_r")
        ax.set_yticks(range(len(patterns)), patterns)
        ax.set_xticks(
            range(len(results)), [r.label for r in results], rotation=60, ha="right", fontsize=6
        )
        fig.colorbar(image, label=f"log10 {results[0].metric}")
        ax.set_title("metric by order (rows) and intensity (columns)")
        fig.tight_layout()
        fig.savefig(folder / "heatmap.png", dpi=120)
        plt.close(fig)
        written.append(folder / "heatmap.png")
    return written


def _pattern(result: StudyResult, order: str) -> str:
    """An order written with the stages' kinds (``P>Q``), so orders of different studies align;
    with the names when two stages share a kind."""
    names = order.split(">")
    kinds = [result.kinds.get(n, n) for n in names]
    return ">".join(kinds) if len(set(kinds)) == len(kinds) else order


def run_study(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    stages: list[CompressionCallback],
    search: str = "exhaustive",
    order: str | None = None,
    curve_bits: list[int] | None = None,
    metric: str = "ppl",
    higher_is_better: bool = False,
    output_dir: str = "outputs/study",
    cells_dir: str | None = None,
    reuse_prefixes: bool = True,
    label: str | None = None,
    logger: Any | None = None,
) -> StudyResult:
    """Run one :class:`OrderStudy` and write its report to ``output_dir`` (what ``ppq study``
    calls). ``curve_bits``: bit widths of the RTN quantization-only curve (default 8 ... 2;
    ``[]`` skips it)."""
    curve = default_curve(curve_bits if curve_bits is not None else DEFAULT_CURVE_BITS)
    study = OrderStudy(
        module,
        datamodule,
        stages,
        search=search,
        order=order,
        curve=curve,
        metric=metric,
        higher_is_better=higher_is_better,
        output_dir=output_dir,
        cells_dir=cells_dir,
        reuse_prefixes=reuse_prefixes,
        label=label,
        logger=logger,
    )
    result = study.run()
    write_report([result], output_dir)
    log_result(result, logger, output_dir)
    return result


def log_result(result: StudyResult, logger: Any | None, report_dir: str | Path) -> None:
    """Send a study's outcome to a Lightning logger: ``result/<metric>`` etc. of its best (or
    only) order as scalars (the key a W&B sweep optimises), and, on a ``WandbLogger``, the study
    table and the plots of ``report_dir`` as ``wandb.Table`` / ``wandb.Image``."""
    if logger is None:
        return
    best = result.orders[result.best_order.split("=")[0]]
    scalars = {
        f"result/{result.metric}": best.value,
        "result/measured_C": best.measured_C,
        "result/nominal_C": best.nominal_C,
        "result/evaluations": float(result.budget.evaluations),
        "result/applications": float(result.budget.applications),
    }
    scalars.update({f"result/{k}": float(v) for k, v in result.pair.items()})
    if result.pih_correct is not None:
        scalars["result/pih_correct"] = float(result.pih_correct)
    logger.log_metrics(scalars)
    if hasattr(logger, "log_table"):  # WandbLogger
        rows = [asdict(c) | {"keys": ">".join(c.keys)} for c in result.cells()]
        logger.log_table(
            key=f"study/{result.label}/cells",
            columns=list(rows[0]),
            data=[list(r.values()) for r in rows],
        )
    if hasattr(logger, "log_image"):
        images = sorted(Path(report_dir).glob("*.png"))
        if images:
            logger.log_image(key=f"study/{result.label}/plots", images=[str(p) for p in images])
    logger.save()
