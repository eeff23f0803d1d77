"""Predicting the best order of compression stages, as a ranking of every order.

Rules that need no compressed model (``interference`` and ``calibration_kl``, which apply the
stages, live in ``order.interference``; ``pairwise_kl``, an n-stage ranking from the
``calibration_kl`` ranking of every pair of stages, in ``order.pairwise``):

- ``pih``: the Progressive Intensity Hypothesis (Kim et al.) as measured by the single-stage
  metric: the weaker perturbation (higher ``M`` alone) first;
- ``pih_cer``: the paper's own form: intensity is the Compression Equivalence Ratio ``C*_f``
  (the quantization ratio at which quantization alone matches the stage), smaller first;
- ``prune_first``: every pruning stage before every quantization stage (Harma et al.), the
  given order otherwise.

A ranking scores every permutation by its Kendall distance to the rule's order (0 = the
predicted order; lower is better), so every order is ranked and the rule's choice comes first.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ppq_lightning.compressed.history import StageKind
from ppq_lightning.errors import PPQConfigError

PREDICTORS = ("pih", "pih_cer", "prune_first", "interference", "calibration_kl", "pairwise_kl")


@dataclass(frozen=True)
class Ranking:
    """Every candidate order, predicted best first, with its score and what the prediction cost.

    Attributes:
        predictor: the predictor's name.
        orders: ``(order, score)`` pairs, best first; lower scores are better.
        cost: ``evaluations`` (full evaluations of a candidate order: 0 for every predictor
            here), ``single_evaluations`` (single stages evaluated to predict), ``applications``
            (stages applied), ``seconds``, and predictor-specific entries.
    """

    predictor: str
    orders: list[tuple[tuple[str, ...], float]]
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def top(self) -> tuple[str, ...]:
        """The predicted best order."""
        return self.orders[0][0]

    def top_k(self, k: int) -> list[tuple[str, ...]]:
        """The ``k`` best-ranked orders."""
        return [order for order, _ in self.orders[:k]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "predictor": self.predictor,
            "orders": [{"order": ">".join(o), "score": s} for o, s in self.orders],
            "cost": dict(self.cost),
        }


def kendall_distance(order: Sequence[str], reference: Sequence[str]) -> int:
    """Pairs of stages that ``order`` puts the other way round than ``reference``."""
    position = {name: i for i, name in enumerate(reference)}
    ranks = [position[name] for name in order]
    return sum(1 for i, j in itertools.combinations(range(len(ranks)), 2) if ranks[i] > ranks[j])


def rank_by_distance(
    predictor: str, names: Sequence[str], reference: Sequence[str], cost: dict[str, float]
) -> Ranking:
    """Every permutation of ``names`` ranked by its Kendall distance to ``reference``."""
    orders = [(o, float(kendall_distance(o, reference))) for o in itertools.permutations(names)]
    orders.sort(key=lambda item: item[1])  # stable: ties keep permutation order
    return Ranking(predictor, orders, cost)


def pih_order(single_stage_metric: dict[str, float]) -> list[str]:
    """The order the Progressive Intensity Hypothesis predicts: weaker perturbation first.

    Args:
        single_stage_metric: ``M`` of the model after each stage applied alone, by stage name.

    Returns:
        Stage names sorted from the weakest perturbation (highest ``M``) to the strongest;
        ties keep the given order.
    """
    return sorted(single_stage_metric, key=lambda name: -single_stage_metric[name])


def pih_ranking(single_stage_metric: dict[str, float]) -> Ranking:
    """``pih``: every order ranked by its distance to :func:`pih_order`."""
    names = list(single_stage_metric)
    cost = {"evaluations": 0, "single_evaluations": len(names) + 1, "applications": len(names)}
    return rank_by_distance("pih", names, pih_order(single_stage_metric), cost)


def pih_cer_ranking(cer: Mapping[str, float], curve_points: int) -> Ranking:
    """``pih_cer``: intensity by ``C*_f`` (smaller = weaker = first).

    Args:
        cer: ``C*`` of every stage (a quantization stage's is its own ``C_Q``).
        curve_points: quantization-only evaluations the curve cost.

    Raises:
        PPQConfigError: when a stage has no ``C*`` (no curve, or a stage beyond its range).
    """
    missing = [n for n, c in cer.items() if c is None or c != c]
    if not cer or missing:
        raise PPQConfigError(
            f"predictor='pih_cer' needs C* of every stage (a quantization curve covering them: "
            f"curve_bits); missing for {missing or 'every stage'}."
        )
    names = list(cer)
    reference = sorted(names, key=lambda n: cer[n])
    cost = {
        "evaluations": 0,
        "single_evaluations": len(names) + 1 + curve_points,
        "applications": len(names) + curve_points,
    }
    return rank_by_distance("pih_cer", names, reference, cost)


def prune_first_ranking(kinds: Mapping[str, str]) -> Ranking:
    """``prune_first``: pruning stages (``P``, ``PQ``) before quantization stages, else as given.

    Raises:
        PPQConfigError: when the stages are not a mix of pruning and quantization.
    """
    names = list(kinds)
    prunes = [n for n in names if StageKind(kinds[n]).prunes]
    others = [n for n in names if n not in prunes]
    if not prunes or not any(StageKind(kinds[n]).quantizes for n in others):
        raise PPQConfigError(
            f"predictor='prune_first' orders pruning before quantization; the stages {kinds} "
            "are not a mix of the two."
        )
    cost = {"evaluations": 0, "single_evaluations": 0, "applications": 0}
    return rank_by_distance("prune_first", names, prunes + others, cost)
