"""The report of one or more order studies: tables (CSV, Markdown, JSON) and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ppq_lightning.reports import write_json, write_table
from ppq_lightning.study.plots import plot_report
from ppq_lightning.study.result import StudyResult


def write_report(results: Sequence[StudyResult], folder: str | Path) -> Path:
    """Write the table of studies and their cells (CSV, JSON, Markdown) and the plots.

    Files: ``studies.csv``, ``studies.md``, ``cells.csv``, ``report.json``, and with two-stage
    studies ``advantage_vs_gap.png``, ``advantage_vs_cer.png``, plus ``heatmap.png`` (the metric
    of every order in every study).
    """
    folder = Path(folder)
    rows = [r.summary_row() for r in results]
    write_table(rows, folder, "studies", formats=("csv", "md"))
    cells = [{"study": r.label, **c.row()} for r in results for c in r.cells()]
    write_table(cells, folder, "cells", formats=("csv",))
    write_json(
        folder / "report.json", {"studies": rows, "cells": cells, "pih_hits": pih_hits(results)}
    )
    plot_report(results, folder)
    return folder


def pih_hits(results: Sequence[StudyResult]) -> dict[str, int]:
    """How many exhaustive studies there are and how often the PIH order was the best."""
    judged = [r for r in results if r.pih_correct is not None]
    return {"studies": len(judged), "pih_correct": sum(bool(r.pih_correct) for r in judged)}
