"""Greedy allocation of per-unit compression levels under a storage budget.

Each unit (a layer's bit width, a block's kept share of channels) has levels ``0, 1, ...``
from mildest to strongest. A move takes one unit one level further; its *efficiency* is the
loss it adds per bit of storage it saves. :func:`best_move` picks the most efficient move
(a move that lowers the loss is taken first), which is the greedy step of a multiple-choice
knapsack; the caller re-measures the losses as the configuration changes (global error
propagation: a loss measured on the whole model, not per layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping


def best_move(
    levels: Mapping[str, int],
    last: Mapping[str, int],
    loss_of_move: Mapping[str, float],
    saved_bits: Callable[[str], float],
) -> str | None:
    """The unit whose next level costs the least loss per saved bit, or None if none can move.

    Args:
        levels: the current level of every unit.
        last: the strongest level of every unit.
        loss_of_move: the measured loss increase of moving each unit one level (units that
            are missing or at their last level are skipped).
        saved_bits: the storage (bits) the move of a unit saves, given the current levels.

    Returns:
        The unit to move; a move that saves nothing is never chosen.
    """
    best, best_score = None, math.inf
    for unit, level in levels.items():
        if level >= last[unit] or unit not in loss_of_move:
            continue
        saved = saved_bits(unit)
        if saved <= 0:
            continue
        score = loss_of_move[unit] / saved
        if score < best_score or (score == best_score and best is not None and unit < best):
            best, best_score = unit, score
    return best
