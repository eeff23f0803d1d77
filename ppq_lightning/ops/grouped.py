"""Solving a grouped convolution group by group.

A grouped convolution (depthwise included) with ``g`` groups is ``g`` independent layers: the
weight rows of group ``j`` (``out / g`` consecutive rows) see only the inputs of group ``j``,
so each group has its own statistic (a Hessian ``(cols, cols)`` or activation norms
``(cols,)``, stacked ``(g, ...)``). :func:`solve_by_groups` runs a layer-wise solver on every
group and joins the results, so GPTQ, SparseGPT and Wanda serve grouped layers unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.grid import Grid


def row_groups(rows: int, groups: int) -> list[slice]:
    """The weight rows of each group: ``groups`` equal runs of consecutive rows.

    Raises:
        PPQConfigError: when ``groups`` does not divide ``rows``.
    """
    if groups < 1 or rows % groups:
        raise PPQConfigError(f"groups={groups!r} does not divide the {rows} weight rows.")
    size = rows // groups
    return [slice(j * size, (j + 1) * size) for j in range(groups)]


def grid_rows(grid: Grid | None, rows: slice) -> Grid | None:
    """The grid of the weight rows ``rows`` (None stays None)."""
    return None if grid is None else grid.select_rows(rows)


def take_rows(tensor: Tensor | None, rows: slice) -> Tensor | None:
    """``tensor[rows]`` (None stays None)."""
    return None if tensor is None else tensor[rows]


_SUMMED = ("loss", "retries")
_MAXIMUM = ("damp",)


def merge_results(results: list[Any]) -> Any:
    """Join the per-group results of a solver: tensors (weights, masks) along the rows, grids
    along their rows, ``loss`` and ``retries`` summed, ``damp`` the largest. A result is a
    tensor or a NamedTuple of such fields (None fields stay None)."""
    first = results[0]
    if isinstance(first, Tensor):
        return torch.cat(results)
    merged = {}
    for field in first._fields:
        values = [getattr(r, field) for r in results]
        if values[0] is None:
            merged[field] = None
        elif isinstance(values[0], Tensor):
            merged[field] = torch.cat(values)
        elif isinstance(values[0], Grid):
            merged[field] = type(values[0]).concat(values)
        elif field in _SUMMED:
            merged[field] = type(values[0])(sum(values))
        elif field in _MAXIMUM:
            merged[field] = max(values)
        else:
            raise TypeError(f"cannot merge the field {field!r} of {type(first).__name__}")
    return type(first)(**merged)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU kernels on one thread while in the context: the problems of a grouped
    layer are tiny (a depthwise 3x3 convolution's Hessian is 9x9), and handing each one to a
    thread pool costs far more than its arithmetic (measured: a 9x9 Cholesky takes 4 us on one
    thread and 7 ms on two busy cores; SparseGPT on a small MobileNetV2 1 s instead of 41 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def solve_by_groups(
    solve: Callable[[Tensor, Tensor, slice], Any], w: Tensor, statistic: Tensor, grouped: bool
) -> Any:
    """``solve(w, statistic, rows)`` for a plain layer; for a grouped one (``statistic`` stacked
    ``(g, ...)``), ``solve(w[rows_j], statistic[j], rows_j)`` per group (single-threaded),
    joined by :func:`merge_results`. ``rows`` lets the solver slice its other row-aligned inputs
    (a mask, a grid)."""
    if not grouped:
        return solve(w, statistic, slice(None))
    groups = row_groups(w.shape[0], statistic.shape[0])
    with single_threaded():
        return merge_results([solve(w[rows], statistic[j], rows) for j, rows in enumerate(groups)])
