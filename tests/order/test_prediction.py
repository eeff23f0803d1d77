import itertools

import pytest

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.prediction import (
    kendall_distance,
    pih_cer_ranking,
    pih_order,
    pih_ranking,
    prune_first_ranking,
)


def test_pih_puts_the_weaker_stage_first_and_ranks_every_order():
    ranking = pih_ranking({"P": -12.0, "Q": -10.0, "S": -30.0})
    assert ranking.top == ("Q", "P", "S") == tuple(pih_order({"P": -12.0, "Q": -10.0, "S": -30.0}))
    assert sorted(o for o, _ in ranking.orders) == sorted(itertools.permutations("PQS"))
    assert [s for _, s in ranking.orders] == sorted(s for _, s in ranking.orders)
    assert ranking.orders[-1] == (("S", "P", "Q"), 3.0)  # every pair the other way round
    assert ranking.cost["evaluations"] == 0 and ranking.cost["single_evaluations"] == 4


def test_pih_cer_orders_by_compression_equivalence_ratio():
    ranking = pih_cer_ranking({"P": 5.3, "Q": 4.0}, curve_points=6)
    assert ranking.top == ("Q", "P") and ranking.cost["single_evaluations"] == 9
    with pytest.raises(PPQConfigError, match="needs C\\* of every stage"):
        pih_cer_ranking({"P": float("nan"), "Q": 4.0}, curve_points=6)


def test_prune_first_keeps_the_given_order_otherwise():
    ranking = prune_first_ranking({"Q8": "Q", "P": "P", "Q4": "Q"})
    assert ranking.top == ("P", "Q8", "Q4") and ranking.cost["applications"] == 0
    with pytest.raises(PPQConfigError, match="not a mix of the two"):
        prune_first_ranking({"Q8": "Q", "Q4": "Q"})


def test_kendall_distance():
    assert kendall_distance("ABC", "ABC") == 0 and kendall_distance("CBA", "ABC") == 3
