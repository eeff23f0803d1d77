import math

import pytest

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.metrics import (
    compression_equivalence_ratio,
    metric_from_perplexity,
    order_advantage,
    performance_gap,
)


def test_gap_and_advantage_on_perplexities():
    # P alone ppl 20, Q alone ppl 30; P->Q ppl 40, Q->P ppl 50 (M = -ppl)
    m_p, m_q = metric_from_perplexity(20.0), metric_from_perplexity(30.0)
    assert performance_gap(m_p, m_q) == 10.0  # pruning hurts less
    assert order_advantage(metric_from_perplexity(40.0), metric_from_perplexity(50.0)) == 10.0


# M = -ppl: dense 10, 8-bit (C=2) 10.5, 4-bit (C=4) 20, 2-bit (C=8) 1000
CURVE = [(1.0, -10.0), (2.0, -10.5), (4.0, -20.0), (8.0, -1000.0)]


def test_cer_interpolates_in_log_c_between_bracketing_points():
    # halfway in M between the 8-bit and 4-bit points is halfway in log C: sqrt(2 * 4)
    assert compression_equivalence_ratio(CURVE, -15.25) == pytest.approx(math.sqrt(8))
    assert compression_equivalence_ratio(CURVE, -20.0) == pytest.approx(4.0)  # on a point
    assert compression_equivalence_ratio(CURVE[::-1], -20.0) == pytest.approx(4.0)  # any order


def test_cer_at_the_ends_of_the_curve():
    assert compression_equivalence_ratio(CURVE, -9.0) == 1.0  # better than dense: mildest C
    assert compression_equivalence_ratio(CURVE, -10.0) == 1.0
    assert compression_equivalence_ratio(CURVE, -2000.0) == math.inf  # worse than 2-bit


def test_cer_on_a_non_monotone_curve_takes_the_first_crossing():
    wobbly = [(1.0, -10.0), (2.0, -30.0), (4.0, -20.0), (8.0, -40.0)]
    # -25 is crossed between C=1 and C=2 first (and again between 4 and 8): the first counts
    c = compression_equivalence_ratio(wobbly, -25.0)
    assert 1.0 < c < 2.0


@pytest.mark.parametrize(
    "curve", [[(1.0, -10.0)], [(1.0, -10.0), (1.0, -11.0)], [(1.0, float("nan")), (2.0, 1.0)]]
)
def test_cer_rejects_bad_curves(curve):
    with pytest.raises(PPQConfigError, match="curve="):
        compression_equivalence_ratio(curve, -10.0)
