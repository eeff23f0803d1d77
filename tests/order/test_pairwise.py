import itertools
import math

import pytest

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.pairwise import order_score, pairwise_preferences, pairwise_ranking
from ppq_lightning.order.prediction import Ranking


def _pair_predictor(first: dict[frozenset, tuple[str, float]], calls: list):
    """A two-stage predictor that puts ``first[{a, b}][0]`` first by margin ``[1]``, counting
    its calls and charging 2 applications per pair."""

    def predict(a: str, b: str) -> Ranking:
        calls.append((a, b))
        winner, margin = first[frozenset((a, b))]
        loser = b if winner == a else a
        return Ranking(
            "toy", [((winner, loser), 0.0), ((loser, winner), margin)], {"applications": 2}
        )

    return predict


def test_consistent_pairs_give_their_order_from_n_choose_2_predictions():
    names = ["P1", "Q", "P2", "L"]
    truth = ["P1", "P2", "Q", "L"]
    first = {
        frozenset((a, b)): (a if truth.index(a) < truth.index(b) else b, 1.0)
        for a, b in itertools.combinations(names, 2)
    }
    calls: list = []
    preferences, cost = pairwise_preferences(names, _pair_predictor(first, calls))
    ranking = pairwise_ranking("pairwise_toy", names, preferences, cost)
    assert ranking.top == tuple(truth) and ranking.orders[0][1] == 0
    # n(n-1)/2 pair predictions, not n! orders
    assert len(calls) == math.comb(4, 2) == cost["pairs"] < math.factorial(4)
    assert cost["applications"] == 2 * 6 and ranking.cost["orders_scored"] == 24
    assert sorted(o for o, _ in ranking.orders) == sorted(itertools.permutations(names))
    assert ranking.orders[-1] == (tuple(reversed(truth)), 6.0)  # every pair against


def test_a_cycle_is_broken_at_its_weakest_preference():
    # a before b (3), b before c (2), c before a (1): keeping the two strong ones gives a>b>c
    first = {
        frozenset("ab"): ("a", 3.0),
        frozenset("bc"): ("b", 2.0),
        frozenset("ac"): ("c", 1.0),
    }
    preferences, cost = pairwise_preferences("abc", _pair_predictor(first, []))
    assert preferences[("a", "b")] == 3.0 and preferences[("a", "c")] == -1.0
    ranking = pairwise_ranking("pairwise_toy", "abc", preferences, cost)
    assert ranking.top == ("a", "b", "c") and ranking.orders[0][1] == 1.0
    assert order_score(("c", "a", "b"), preferences) == 2.0  # breaks b before c only


def test_bad_pairs_are_refused():
    with pytest.raises(PPQConfigError, match="two or more distinct stages"):
        pairwise_preferences(["P", "P"], lambda a, b: None)

    def wrong(a: str, b: str) -> Ranking:
        return Ranking("toy", [((a, b, "x"), 0.0)], {})

    with pytest.raises(PPQConfigError, match="not the two orders"):
        pairwise_preferences(["P", "Q"], wrong)
    with pytest.raises(PPQConfigError, match=r"missing \[\('P', 'S'\)\]"):
        pairwise_ranking("toy", ["P", "Q", "S"], {("P", "Q"): 1.0, ("Q", "S"): 1.0}, {})
