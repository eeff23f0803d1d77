"""What an order study returns: its cells, the best and the predicted order, and its cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ppq_lightning.study.cells import Cell


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
    """The outcome of one :class:`~ppq_lightning.study.engine.OrderStudy` run (one set of stages).

    ``best_order`` is the order with the highest ``M``; orders tied exactly are all named,
    joined by ``=`` (``"P>Q=Q>P"``), and the PIH prediction is right if it is one of them.
    ``key`` identifies the study in a report folder (``OrderStudy.study_key``: its data,
    metric, search and stages, not its label); a report merged with an earlier one replaces the
    row of the same key (``study.report.write_report(merge=True)``); ``""`` matches nothing.
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
    prediction: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The result as plain data (what ``report.json`` keeps under ``results``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyResult:
        """The result :meth:`to_dict` gave (read back from ``report.json``).

        Raises:
            KeyError, TypeError: when ``data`` is not what :meth:`to_dict` writes.
        """

        def cell(d: dict[str, Any]) -> Cell:
            return Cell(**{**d, "keys": tuple(d["keys"])})

        known = {f.name for f in fields(cls)}
        return cls(
            **{
                **{k: v for k, v in data.items() if k in known},
                "dense": cell(data["dense"]),
                "singles": {n: cell(c) for n, c in data["singles"].items()},
                "curve": [cell(c) for c in data["curve"]],
                "orders": {n: cell(c) for n, c in data["orders"].items()},
                "budget": Budget(**data["budget"]),
            }
        )

    @property
    def best(self) -> Cell:
        """The cell of the best order (the first of tied ones)."""
        return self.orders[self.best_order.split("=")[0]]

    def summary_row(self) -> dict[str, Any]:
        """One flat row for the study table (CSV/Markdown)."""
        best = self.best
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
        if self.prediction:
            ranking = self.prediction["orders"]
            row.update(
                predictor=self.prediction["predictor"],
                predicted_order=ranking[0]["order"],
                predicted_ranking=" ; ".join(f"{r['order']}:{r['score']:.4g}" for r in ranking),
                prediction_seconds=self.prediction["cost"].get("seconds", 0.0),
            )
        return row

    def cells(self) -> list[Cell]:
        """Every cell of the study: dense, single stages, the curve, the orders."""
        return [self.dense, *self.singles.values(), *self.curve, *self.orders.values()]
