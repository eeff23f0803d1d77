import math

import pytest

from ppq_lightning.study.assemble import best_orders, equivalence_ratios, pair_metrics
from ppq_lightning.study.cells import Cell


def cell(M: float, avg_bits: float = 16.0, nominal_C: float = 1.0, measured_C: float = 1.0):
    return Cell("x", "single", (), -M, M, nominal_C, measured_C, 0.0, avg_bits, 0.0)


def test_best_orders_joins_ties():
    assert best_orders({"P>Q": cell(-3), "Q>P": cell(-2)}) == "Q>P"
    assert best_orders({"P>Q": cell(-2), "Q>P": cell(-2)}) == "P>Q=Q>P"


def test_c_star_is_read_on_the_nominal_axis_of_the_curve():
    dense = cell(-10, avg_bits=16)
    curve = [cell(-11, avg_bits=8, measured_C=1.9), cell(-13, avg_bits=4, measured_C=3.7)]
    singles = {"P": cell(-12), "good": cell(-9), "bad": cell(-20)}
    cer = equivalence_ratios(dense, curve, singles)
    # nominal C 2 and 4 (16/8, 16/4), not the measured 1.9 and 3.7; -12 halfway in log C
    assert cer["P"] == pytest.approx(2 * math.sqrt(2))
    assert cer["good"] == 1.0 and cer["bad"] == math.inf
    assert equivalence_ratios(dense, [], singles) == {}


def test_pair_metrics_of_a_prune_quantize_pair():
    singles = {"P": cell(-12), "Q": cell(-11, nominal_C=4.0)}
    orders = {"P>Q": cell(-15), "Q>P": cell(-14)}
    pair = pair_metrics(["P", "Q"], {"P": "P", "Q": "Q"}, singles, orders, {"P": 3.0})
    assert pair == {"G": -1.0, "A": -1.0, "C*_P - C_Q": -1.0}  # A = M(P>Q) - M(Q>P)
    assert pair_metrics(["P"], {"P": "P"}, singles, {}, {}) == {}
