"""Plots of order studies: A against G and against ``C*_P - C_Q``, and a heatmap of the metric
by order and study. Drawn with matplotlib's object API (no pyplot, no global backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ppq_lightning.reports import atomic_write
from ppq_lightning.study.result import StudyResult


def save_figure(figure: Figure, path: Path, dpi: int = 120) -> Path:
    """Write ``figure`` as a PNG, atomically (a reader never sees half an image)."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return path


def plot_report(results: Sequence[StudyResult], folder: Path) -> list[Path]:
    """A against G, A against ``C*_P - C_Q`` (two-stage studies), and a heatmap of the metric
    (log10 when it spans more than a factor 10, as perplexities do; bright is better)
    by order pattern (rows) and study (columns). Returns the files written."""
    written = []
    pairs = [r for r in results if "A" in r.pair]
    for key, name, xlabel in (
        ("G", "advantage_vs_gap.png", "G(f1, f2) = M(f1) - M(f2)"),
        ("C*_P - C_Q", "advantage_vs_cer.png", "C*_P - C_Q"),
    ):
        points = [(r.pair[key], r.pair["A"], r.label) for r in pairs if key in r.pair]
        if not points:
            continue
        finite = [x for x, _, _ in points if math.isfinite(x)]
        edge = max(finite, default=0.0) + 1.0  # where C* beyond the curve is drawn
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        for x, y, label in points:
            beyond = not math.isfinite(x)
            ax.scatter([edge if beyond else x], [y], marker=">" if beyond else "o", color="C0")
            ax.annotate(
                label + (" (C* beyond curve)" if beyond else ""),
                (edge if beyond else x, y),
                fontsize=6,
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("A(f1 -> f2)")
        fig.tight_layout()
        written.append(save_figure(fig, folder / name))
    patterns = sorted({_pattern(r, o) for r in results for o in r.orders})
    if results and patterns:
        grid = torch.full((len(patterns), len(results)), float("nan"))
        for j, r in enumerate(results):
            for o, cell in r.orders.items():
                grid[patterns.index(_pattern(r, o)), j] = cell.value
        fig = Figure(figsize=(max(4, 0.6 * len(results) + 2), 0.5 * len(patterns) + 2))
        ax = fig.subplots()
        seen = grid[~grid.isnan()]
        logarithmic = bool((seen > 0).all() and seen.max() > 10 * seen.min())  # perplexities
        shown = torch.log10(grid) if logarithmic else grid
        cells = [c for r in results for c in r.orders.values()]
        lower_is_better = any(c.value != 0 and -c.value == c.M for c in cells)  # M = -value
        cmap = "viridis_r" if lower_is_better else "viridis"  # bright is good either way
        image = ax.imshow(shown.numpy(), aspect="auto", cmap=cmap)
        ax.set_yticks(range(len(patterns)), patterns)
        ax.set_xticks(
            range(len(results)), [r.label for r in results], rotation=60, ha="right", fontsize=6
        )
        label = f"log10 {results[0].metric}" if logarithmic else results[0].metric
        fig.colorbar(image, ax=ax, label=label)
        ax.set_title("metric by order (rows) and intensity (columns)")
        fig.tight_layout()
        written.append(save_figure(fig, folder / "heatmap.png"))
    return written


def _pattern(result: StudyResult, order: str) -> str:
    """An order written with the stages' kinds (``P>Q``), so orders of different studies align;
    with the names when two stages share a kind."""
    names = order.split(">")
    kinds = [result.kinds.get(n, n) for n in names]
    return ">".join(kinds) if len(set(kinds)) == len(kinds) else order
