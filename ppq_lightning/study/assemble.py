"""From cells to a study's results: the best order, C* of each stage, and G, A, C*_P - C_Q.

Pure functions of measured cells (``study.cells.Cell``); the definitions are in
docs/definitions.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ppq_lightning.compressed.accounting import nominal_compression_rate
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.order.metrics import (
    compression_equivalence_ratio,
    order_advantage,
    performance_gap,
)
from ppq_lightning.study.cells import Cell


def best_orders(orders: Mapping[str, Cell]) -> str:
    """The order(s) of highest ``M``, joined by ``=`` when tied (equal metrics: every one is
    best)."""
    best_m = max(c.M for c in orders.values())
    return "=".join(o for o, c in orders.items() if best_m == c.M)


def equivalence_ratios(
    dense: Cell, curve: Sequence[Cell], singles: Mapping[str, Cell]
) -> dict[str, float]:
    """``C*`` of each single stage, on the quantization-only ``curve`` (empty: no ``C*``).

    The curve's axis is the **nominal** ``C_Q = B_orig / B_Q`` of each curve cell (``B_Q`` its
    recorded average value bits, ``B_orig`` the dense model's), with the dense model at
    ``C = 1``; see docs/definitions.md ("Which C").
    """
    if not curve:
        return {}
    b_orig = round(dense.avg_bits)
    points = [(1.0, dense.M)] + [
        (nominal_compression_rate(0.0, c.avg_bits, b_orig), c.M) for c in curve
    ]
    return {n: compression_equivalence_ratio(points, c.M) for n, c in singles.items()}


def pair_metrics(
    names: Sequence[str],
    kinds: Mapping[str, str],
    singles: Mapping[str, Cell],
    orders: Mapping[str, Cell],
    cer: Mapping[str, float],
) -> dict[str, float]:
    """``G``, ``A`` and ``C*_P - C_Q`` (the pruning stage's ``C*`` minus the quantization
    stage's nominal ``C_Q``) of a two-stage exhaustive study, the first stage named first;
    empty otherwise."""
    if len(names) != 2 or len(orders) != 2:
        return {}
    f1, f2 = names
    pair = {
        "G": performance_gap(singles[f1].M, singles[f2].M),
        "A": order_advantage(orders[f"{f1}>{f2}"].M, orders[f"{f2}>{f1}"].M),
    }
    p = next((n for n in names if StageKind(kinds[n]) is StageKind.PRUNE), None)
    q = next((n for n in names if StageKind(kinds[n]) is StageKind.QUANTIZE), None)
    if p and q and cer:
        pair["C*_P - C_Q"] = cer[p] - singles[q].nominal_C
    return pair
