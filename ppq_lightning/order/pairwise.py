"""n-stage rankings built from pairwise predictions: ``n(n-1)/2`` two-stage predictions instead
of applying ``n!`` orders.

For every unordered pair of stages ``{a, b}`` a two-stage predictor ranks ``a>b`` against
``b>a`` on the pair alone (the other stages left out). Its *preference*
``p(a, b) = score(b>a) - score(a>b)`` is positive when ``a`` should come first, in the
predictor's own units (a Kendall distance for the rules, an output error or a KL for the
calibrated predictors), and ``p(b, a) = -p(a, b)``. An ``n``-stage order is scored by the
preferences it goes against::

    score(order) = sum over pairs {a, b} that the order puts b before a, with p(a, b) > 0,
                   of p(a, b)

a Kendall distance weighted by how strongly each pair was predicted; 0 for an order that agrees
with every pairwise prediction. Every permutation is scored (no stage is applied for it), best
first, ties in permutation order. Cyclic preferences (``a`` before ``b``, ``b`` before ``c``,
``c`` before ``a``) give no order a score of 0: the best ones break the weakest preference.

What it does not see: interactions of three or more stages (a pair is predicted without the
stages that come between its two members in a longer order).

Example::

    from ppq_lightning.order.pairwise import pairwise_preferences, pairwise_ranking

    def predict_pair(a, b):  # any two-stage predictor, e.g. calibration_kl on stages a and b
        ...

    preferences, cost = pairwise_preferences(["P1", "Q", "P2"], predict_pair)
    ranking = pairwise_ranking("pairwise_calibration_kl", ["P1", "Q", "P2"], preferences, cost)
    ranking.top  # ("P1", "P2", "Q"), say
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.prediction import Ranking

Preferences = dict[tuple[str, str], float]
"""``{(a, b): p(a, b)}`` for one ordering of every unordered pair (``p > 0``: ``a`` first)."""


def pairwise_preferences(
    names: Sequence[str], predict_pair: Callable[[str, str], Ranking]
) -> tuple[Preferences, dict[str, float]]:
    """Predict every unordered pair of ``names`` once and read its preference.

    Args:
        names: the stages, at least two, distinct.
        predict_pair: ``predict_pair(a, b)`` ranks the two orders ``(a, b)`` and ``(b, a)`` of
            one pair (lower score better), e.g. a two-stage ``calibration_kl`` ranking.

    Returns:
        The preferences, and the predictions' costs summed key by key, with ``pairs`` (how many
        pairs were predicted: ``n(n-1)/2``).

    Raises:
        PPQConfigError: fewer than two or repeated names; a pair ranking that does not rank
            exactly the pair's two orders.
    """
    names = list(names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise PPQConfigError(f"pairwise rankings need two or more distinct stages, not {names}.")
    preferences: Preferences = {}
    cost: dict[str, float] = {"pairs": 0.0}
    for a, b in itertools.combinations(names, 2):
        ranking = predict_pair(a, b)
        scores = {tuple(order): score for order, score in ranking.orders}
        if set(scores) != {(a, b), (b, a)}:
            raise PPQConfigError(
                f"the pair ranking of {a!r} and {b!r} ranks {sorted(scores)}, not the two "
                f"orders {(a, b)} and {(b, a)}."
            )
        preferences[(a, b)] = scores[(b, a)] - scores[(a, b)]
        for key, value in ranking.cost.items():
            cost[key] = cost.get(key, 0.0) + float(value)
        cost["pairs"] += 1
    return preferences, cost


def order_score(order: Sequence[str], preferences: Mapping[tuple[str, str], float]) -> float:
    """The summed strength of the pairwise preferences ``order`` goes against (0: none)."""
    position = {name: i for i, name in enumerate(order)}
    score = 0.0
    for (a, b), p in preferences.items():
        first, second = (a, b) if p > 0 else (b, a)
        if position[first] > position[second]:
            score += abs(p)
    return score


def pairwise_ranking(
    predictor: str,
    names: Sequence[str],
    preferences: Mapping[tuple[str, str], float],
    cost: Mapping[str, float],
) -> Ranking:
    """Every permutation of ``names`` ranked by :func:`order_score` (best first).

    Args:
        predictor: the ranking's name (``"pairwise_calibration_kl"``).
        names: the stages.
        preferences: ``p(a, b)`` for one ordering of every unordered pair of ``names``.
        cost: what the pair predictions cost (:func:`pairwise_preferences`).

    Raises:
        PPQConfigError: a pair of ``names`` without a preference, or a preference naming a
            stage that is not in ``names``.
    """
    names = list(names)
    given = {frozenset(pair) for pair in preferences}
    needed = {frozenset(pair) for pair in itertools.combinations(names, 2)}
    if given != needed:
        missing = sorted(tuple(sorted(p)) for p in needed - given)
        extra = sorted(tuple(sorted(p)) for p in given - needed)
        raise PPQConfigError(
            f"pairwise_ranking needs one preference per pair of {names}: missing {missing}, "
            f"not stages of this schedule {extra}."
        )
    orders = [(o, order_score(o, preferences)) for o in itertools.permutations(names)]
    orders.sort(key=lambda item: item[1])  # stable: ties keep permutation order
    return Ranking(predictor, orders, {**cost, "orders_scored": float(len(orders))})
