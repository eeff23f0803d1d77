"""The report of one or more order studies: tables (CSV, Markdown, JSON) and plots."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from ppq_lightning.reports import write_json, write_table
from ppq_lightning.study.plots import plot_report
from ppq_lightning.study.result import StudyResult

REPORT = "report.json"
RESULTS = "results.json"
LOCK = ".report.lock"


def write_report(results: Sequence[StudyResult], folder: str | Path, merge: bool = False) -> Path:
    """Write the table of studies and their cells (CSV, JSON, Markdown) and the plots.

    Files: ``studies.csv``, ``studies.md``, ``cells.csv``, ``report.json``, and with two-stage
    studies ``advantage_vs_gap.png``, ``advantage_vs_cer.png``, plus ``heatmap.png`` (the metric
    of every order in every study). ``results.json`` keeps every study whole under ``results``
    (what ``merge`` reads back) and the keys of the studies of this call under ``latest``
    (``ppq export --from-study --order best`` takes the best order of the latest study, the one
    ``study.yaml`` describes). Every file is replaced atomically.

    Args:
        results: the studies, one row each.
        folder: where the files go (created if needed).
        merge: keep the studies the folder's report already holds (``ppq study`` does): a study
            of ``results`` with the ``key`` of one there replaces its row in place, the others
            are added after them. The read and the write happen under a lock on
            ``folder/.report.lock``, so two studies finishing at once both keep their rows.
            Without ``merge`` the files hold ``results`` only.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    latest = [r.key for r in results]
    with FileLock(folder / LOCK) if merge else contextlib.nullcontext():
        if merge:
            results = merge_results(read_results(folder), results)
        rows = [r.summary_row() for r in results]
        write_table(rows, folder, "studies", formats=("csv", "md"))
        cells = [{"study": r.label, **c.row()} for r in results for c in r.cells()]
        write_table(cells, folder, "cells", formats=("csv",))
        write_json(
            folder / REPORT, {"studies": rows, "cells": cells, "pih_hits": pih_hits(results)}
        )
        write_json(folder / RESULTS, {"latest": latest, "results": [r.to_dict() for r in results]})
        plot_report(results, folder)
    return folder


def read_results(folder: str | Path) -> list[StudyResult]:
    """The studies the report in ``folder`` holds, read back from its ``results.json`` (none
    when the folder has no report).

    A report whose studies cannot be read back (written by an earlier ppq-lightning, which kept
    no ``results.json``, or damaged) is named in a warning and counts as empty: its rows are
    replaced.
    """
    folder = Path(folder)
    path = folder / RESULTS
    if not path.is_file() and not (folder / REPORT).is_file():
        return []
    try:
        return [StudyResult.from_dict(r) for r in json.loads(path.read_text())["results"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(
            f"the report in {folder} cannot be read back ({type(err).__name__}: {err}; an "
            f"earlier ppq-lightning wrote no {RESULTS}): it is written with the new studies "
            "only. Run the earlier studies again with this folder to get their rows back (their "
            "cells are cached: nothing is recomputed).",
            stacklevel=2,
        )
        return []


def merge_results(earlier: Sequence[StudyResult], new: Sequence[StudyResult]) -> list[StudyResult]:
    """``earlier`` with each study of ``new`` in place of the one of the same ``key`` (in its
    row), the other new studies after them; a later study of ``new`` replaces an earlier one of
    the same key. An empty key matches nothing."""
    merged = list(earlier)
    for result in new:
        same = [i for i, r in enumerate(merged) if result.key and r.key == result.key]
        if same:
            merged[same[0]] = result
        else:
            merged.append(result)
    return merged


def pih_hits(results: Sequence[StudyResult]) -> dict[str, int]:
    """How many exhaustive studies there are and how often the PIH order was the best."""
    judged = [r for r in results if r.pih_correct is not None]
    return {"studies": len(judged), "pih_correct": sum(bool(r.pih_correct) for r in judged)}
