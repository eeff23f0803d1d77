"""``ppq sweep SWEEP.yaml --output DIR``: run a W&B sweep file locally (``study.sweep``), print
the table, and exit non-zero when a point failed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppq_lightning.study.sweep import __doc__ as SWEEP_DOC
from ppq_lightning.study.sweep import failed_points, run_sweep


def sweep_main(argv: list[str]) -> list[dict[str, Any]]:
    """Parse ``ppq sweep`` arguments, run the sweep, print its table.

    Raises:
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
