"""The order metrics of ``docs/definitions.md``, on a higher-is-better metric ``M``.

- Metric ``M`` is higher-is-better (accuracy, or ``-perplexity``).
- Performance gap ``G(f1, f2) = M(f1(phi)) - M(f2(phi))``.
- Order advantage ``A(f1 -> f2) = M((f2 o f1)(phi)) - M((f1 o f2)(phi))``: positive when
  applying ``f1`` first is better.
- Compression Equivalence Ratio ``C*_f``: the quantization ratio at which quantization alone
  matches ``f`` (interpolated on a measured quantization-only curve).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from ppq_lightning.errors import PPQConfigError


def metric_value(value: float, higher_is_better: bool) -> float:
    """Turn a logged value into the higher-is-better metric ``M`` (``-ppl`` for perplexity)."""
    return value if higher_is_better else -value


def performance_gap(metric_f1: float, metric_f2: float) -> float:
    """``G(f1, f2) = M(f1(phi)) - M(f2(phi))``; positive when ``f1`` hurts less."""
    return metric_f1 - metric_f2


def order_advantage(metric_f1_first: float, metric_f2_first: float) -> float:
    """``A(f1 -> f2) = M(f2 o f1) - M(f1 o f2)``; positive when applying ``f1`` first wins.

    Args:
        metric_f1_first: ``M`` after applying ``f1`` then ``f2``.
        metric_f2_first: ``M`` after applying ``f2`` then ``f1``.
    """
    return metric_f1_first - metric_f2_first


def metric_from_perplexity(ppl: float) -> float:
    """The higher-is-better metric for language models: ``M = -ppl``."""
    return -ppl


def compression_equivalence_ratio(curve: Sequence[tuple[float, float]], metric: float) -> float:
    """The Compression Equivalence Ratio ``C*_f``: the quantization ratio ``C_Q`` at which
    quantization alone reaches the metric ``M(f(phi)) = metric`` of a method ``f``.

    Interpolated linearly in ``log C`` between the two measured points of the
    quantization-only curve that bracket ``metric``, walking from the mildest point (usually
    the dense model, ``C = 1``) towards stronger quantization.

    Args:
        curve: ``(C_Q, M)`` points of quantization alone (e.g. ``(1, M_dense)``,
            ``(2, M_8bit)``, ... ``(8, M_2bit)``), in any order, at least two.
        metric: ``M`` of the method, higher is better.

    Returns:
        ``C*_f``. At the ends: the mildest point's ``C`` when ``metric`` is at least as good as
        it (``f`` costs nothing quantization would notice); ``math.inf`` when ``metric`` is
        worse than the strongest point (``f`` hurts more than any quantization measured). On a
        non-monotone curve, the first crossing from the mild end is returned.

    Raises:
        PPQConfigError: with fewer than two points, repeated ratios, or a non-finite value.
    """
    points = sorted((float(c), float(m)) for c, m in curve)
    values = [v for point in points for v in point] + [float(metric)]
    if len(points) < 2 or not all(math.isfinite(v) for v in values):
        raise PPQConfigError(
            f"curve={curve!r}, metric={metric!r}: the quantization-only curve needs at least "
            "two finite (C_Q, M) points and a finite metric."
        )
    if len({c for c, _ in points}) < len(points) or points[0][0] <= 0:
        raise PPQConfigError(f"curve={curve!r}: the ratios C_Q must be positive and distinct.")
    if metric >= points[0][1]:
        return points[0][0]
    for (c1, m1), (c2, m2) in itertools.pairwise(points):
        if m2 <= metric <= m1:  # the first segment that falls through the metric
            t = (m1 - metric) / (m1 - m2) if m1 != m2 else 0.0
            return math.exp(math.log(c1) + t * (math.log(c2) - math.log(c1)))
    return math.inf
