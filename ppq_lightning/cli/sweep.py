"""``ppq sweep SWEEP.yaml --output DIR``: run a W&B sweep file locally as ``wandb agent`` runs it
(``study.sweep``), print the table of what each point's W&B run reported, and exit non-zero
when a point failed (1) or the sweep file is bad (2, through ``ppq``'s error handling)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppq_lightning.study.sweep import __doc__ as SWEEP_DOC
from ppq_lightning.study.sweep import failed_points, run_sweep


def sweep_main(argv: list[str]) -> list[dict[str, Any]]:
    """Parse ``ppq sweep`` arguments, run the sweep, print its table.

    Args:
        argv: the arguments after ``ppq sweep``.

    Returns:
        The table's rows.

    Raises:
        PPQConfigError: on a bad sweep file (missing, not YAML, not a grid, a bad command or
            metric) or ``--output``, before any point runs.
        SystemExit: naming the failed points (after every point ran and the table is written).
    """
    parser = argparse.ArgumentParser(prog="ppq sweep", description=SWEEP_DOC)
    parser.add_argument("sweep", help="a W&B sweep YAML file (method: grid)")
    parser.add_argument("--output", required=True, help="folder for points, cells and the table")
    args = parser.parse_args(argv)
    rows = run_sweep(args.sweep, args.output)
    print(Path(args.output, "sweep.md").read_text())
    failed = failed_points(rows)
    if failed:
        raise SystemExit(
            f"sweep points {failed} failed; their logs are in {args.output}/points/ID/log.txt "
            "(ID: the row's `id`)."
        )
    return rows
