"""Order studies: apply two compression stages in both orders and compare.

For each pair ``(f1, f2)`` this runs ``Trainer.validate`` on fresh copies of the dense model with
the callbacks ``[]``, ``[f1]``, ``[f2]``, ``[f1, f2]`` and ``[f2, f1]`` (list order is
compression order), checks the invariants of every compressed model, and reports the
performance gap ``G(f1, f2)``, the order advantage ``A(f1 -> f2)``, the winning order and whether
the Progressive Intensity Hypothesis (weaker first) predicted it. Single-stage runs shared by
several pairs are run once.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from tqdm.auto import tqdm

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.metrics import (
    compression_summary,
    metric_value,
    order_advantage,
    performance_gap,
    pih_order,
)
from ppq_lightning.state import check_invariants


@dataclass(frozen=True)
class RunResult:
    """One ``Trainer.validate`` of a copy of the dense model under a list of stages."""

    order: str
    value: float
    nominal_C: float
    measured_C: float
    sparsity: float
    avg_bits: float
    seconds: float


@dataclass(frozen=True)
class PairResult:
    """Both orders of one pair of stages, with the metrics of Kim et al."""

    first: str
    second: str
    dense: float
    first_alone: float
    second_alone: float
    first_then_second: float
    second_then_first: float
    nominal_C: float
    measured_C_first_then_second: float
    measured_C_second_then_first: float
    gap: float
    advantage: float
    best_order: str
    pih_order: str
    pih_correct: bool


class OrderStudy:
    """Compare the two orders of pairs of compression stages on one model.

    Args:
        module: the dense LightningModule; it is never modified (each run uses a deep copy).
        datamodule: evaluation data (its validation dataloader).
        metric: the logged key to compare, e.g. ``"val/ppl"``.
        higher_is_better: False for perplexity-like metrics (then ``M = -value``).
        output_dir: where per-run CSV logs and the report go.
        trainer_kwargs: extra ``Trainer`` arguments (``accelerator``, ``precision``, ...).

    Raises:
        PPQConfigError: when a run does not log ``metric``.
    """

    def __init__(
        self,
        module: L.LightningModule,
        datamodule: L.LightningDataModule,
        metric: str = "val/ppl",
        higher_is_better: bool = False,
        output_dir: str | Path = "outputs/order_study",
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.module, self.datamodule = module, datamodule
        self.metric, self.higher_is_better = metric, higher_is_better
        self.output_dir = Path(output_dir)
        self.trainer_kwargs = {"accelerator": "auto", "devices": 1, **(trainer_kwargs or {})}
        self.runs: dict[tuple[str, ...], RunResult] = {}

    def run(self, stages: list[CompressionCallback]) -> RunResult:
        """Validate a fresh copy of the dense model compressed by ``stages`` in list order."""
        key = tuple(s.state_key for s in stages)
        if key in self.runs:
            return self.runs[key]
        order = ">".join(s.display_label for s in stages) or "dense"
        module = copy.deepcopy(self.module)
        callbacks = [copy.deepcopy(s) for s in stages]
        logger = CSVLogger(
            self.output_dir, name="runs", version=f"{len(self.runs):02d}_{_slug(order)}"
        )
        trainer = L.Trainer(
            callbacks=callbacks,
            logger=logger,
            enable_checkpointing=False,
            enable_model_summary=False,
            **self.trainer_kwargs,
        )
        start = time.perf_counter()
        results = trainer.validate(module, datamodule=self.datamodule, verbose=False)[0]
        seconds = time.perf_counter() - start
        if self.metric not in results:
            raise PPQConfigError(
                f"metric={self.metric!r} was not logged by validation; logged: {sorted(results)}."
            )
        check_invariants(module)
        b_orig = stages[0].b_orig if stages else 16
        summary = compression_summary(module, b_orig)
        self.runs[key] = RunResult(
            order,
            float(results[self.metric]),
            summary.nominal_C,
            summary.measured_C,
            summary.sparsity,
            summary.avg_bits,
            seconds,
        )
        return self.runs[key]

    def compare(self, first: CompressionCallback, second: CompressionCallback) -> PairResult:
        """Run the dense model, each stage alone and both orders; return the pair's metrics."""
        if first.display_label == second.display_label:
            raise PPQConfigError(
                f"both stages are labelled {first.display_label!r}: give them "
                "distinct `name` arguments."
            )
        a, b = first.display_label, second.display_label
        dense = self.run([])
        alone = {a: self.run([first]), b: self.run([second])}
        ab, ba = self.run([first, second]), self.run([second, first])
        m = {name: metric_value(r.value, self.higher_is_better) for name, r in alone.items()}
        m_ab, m_ba = (metric_value(r.value, self.higher_is_better) for r in (ab, ba))
        advantage = order_advantage(m_ab, m_ba)
        best = f"{a}>{b}" if advantage > 0 else f"{b}>{a}" if advantage < 0 else "tie"
        predicted = ">".join(pih_order(m))
        return PairResult(
            first=a,
            second=b,
            dense=dense.value,
            first_alone=alone[a].value,
            second_alone=alone[b].value,
            first_then_second=ab.value,
            second_then_first=ba.value,
            nominal_C=ab.nominal_C,
            measured_C_first_then_second=ab.measured_C,
            measured_C_second_then_first=ba.measured_C,
            gap=performance_gap(m[a], m[b]),
            advantage=advantage,
            best_order=best,
            pih_order=predicted,
            pih_correct=predicted == best,
        )

    def study(
        self, pairs: list[tuple[CompressionCallback, CompressionCallback]]
    ) -> list[PairResult]:
        """Compare every pair (with a progress bar) and write the report files."""
        results = [self.compare(f, s) for f, s in tqdm(pairs, desc="order study", unit="pair")]
        self.write_report(results)
        return results

    def write_report(self, results: list[PairResult]) -> Path:
        """Write ``order_study.csv``, ``order_study.json`` and ``order_study.png``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in results]
        with open(self.output_dir / "order_study.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (self.output_dir / "order_study.json").write_text(
            json.dumps(
                {
                    "metric": self.metric,
                    "higher_is_better": self.higher_is_better,
                    "pairs": rows,
                    "runs": [asdict(r) for r in self.runs.values()],
                },
                indent=2,
            )
        )
        plot_order_study(results, self.metric, self.output_dir / "order_study.png")
        return self.output_dir


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text.replace(">", "_then_"))


def plot_order_study(results: list[PairResult], metric: str, path: Path) -> None:
    """Grouped bars per pair: dense, each stage alone, and both orders (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = ["dense", "first_alone", "second_alone", "first_then_second", "second_then_first"]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(results)), 4))
    width = 0.8 / len(fields)
    for i, name in enumerate(fields):
        xs = [j + (i - len(fields) / 2 + 0.5) * width for j in range(len(results))]
        ax.bar(xs, [getattr(r, name) for r in results], width, label=name.replace("_", " "))
    ax.set_xticks(range(len(results)), [f"{r.first} / {r.second}" for r in results], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(metric)
    ax.set_title("Compression order study: each stage alone and in both orders")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
