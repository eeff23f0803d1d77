"""The depth-first walk over orders that share prefixes: each prefix is applied once.

A study measuring every order of ``P``, ``Q`` and ``S`` applies ``P`` once for ``P>Q>S`` and
``P>S>Q``; the predictors that score orders without evaluating them walk the same way. A copy of
the model is made at each branch, and the last branch below a prefix takes the prefix's own
model (the root, the dense model, is never modified).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TypeVar

from ppq_lightning.modules.offload import copy_model

Model = TypeVar("Model")


def walk_orders(
    root: Model,
    orders: Collection[tuple[str, ...]],
    apply: Callable[[Model, str], None],
    visit: Callable[[Model, tuple[str, ...], float], None],
) -> int:
    """Apply every order of ``orders`` to copies of ``root``, sharing prefixes, and call
    ``visit(model, order, seconds)`` on the model after each one (``seconds``: the time of
    applying its last stage; 0 for the empty order). ``visit`` must leave the model as it got
    it (it goes on to the orders below it).

    Args:
        root: the model before any stage (never modified).
        orders: the orders to reach, as tuples of stage names (``()`` for ``root`` itself).
        apply: ``apply(model, name)`` applies the stage called ``name`` in place.
        visit: called once per order of ``orders``, parents before children.

    Returns:
        The number of stage applications.

    Example::

        walk_orders(model, [("P",), ("P", "Q"), ("Q", "P")], apply, visit)  # 3 applications
    """
    wanted = set(orders)
    applications = 0

    def go(model: Model, prefix: tuple[str, ...], seconds: float) -> None:
        nonlocal applications
        if prefix in wanted:
            visit(model, prefix, seconds)
        depth = len(prefix)
        children = sorted({o[depth] for o in wanted if len(o) > depth and o[:depth] == prefix})
        for i, name in enumerate(children):
            child = model if i == len(children) - 1 and prefix else copy_model(model)
            start = time.perf_counter()
            apply(child, name)
            applications += 1
            go(child, (*prefix, name), time.perf_counter() - start)

    go(root, (), 0.0)
    return applications
