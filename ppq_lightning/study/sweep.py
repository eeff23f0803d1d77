"""Run a W&B sweep file locally: one ``ppq study`` (or ``ppq fit|validate|test``) run per grid
point, then one table.

The same file works with ``wandb sweep configs/sweeps/order_grid.yaml`` + ``wandb agent``: its
``command`` runs our CLI, and the parameters arrive as ``--order=P>Q --P.sparsity=0.5`` (W&B's
``${args}``), which ``ppq study`` reads as the order and stage overrides. Without a W&B server,

    ppq sweep configs/sweeps/smoke.yaml --output outputs/sweep_smoke

expands the grid into exactly the commands an agent would run, runs them one after another
(each point in ``OUTPUT/points/NNN``, all sharing the cell cache ``OUTPUT/cells``, so the dense
model is evaluated once), and writes ``OUTPUT/sweep.csv``, ``sweep.json`` and ``sweep.md``: one
row per point, its parameters and its results. Finished points are not run again.

A point that runs ``ppq fit|validate|test`` (a config with a ``CompressionSchedule``; the
parameters are LightningCLI arguments such as ``--order=Q>L>P``, ``--trainer.max_steps=60``)
gets ``--report_dir OUTPUT/points/NNN``; its row is the schedule's final stage (ppl, C, ...)
with the dense model's metrics as ``dense_*`` (``configs/sweeps/lora_orders.yaml``).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.reports import write_table

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


RUNS = ("fit", "validate", "test")


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a W&B sweep file for local grid runs.

    Raises:
        PPQConfigError: when the file is missing, not a grid, or a parameter has no values.
    """
    path = Path(path)
    if not path.is_file():
        raise PPQConfigError(f"sweep file {str(path)!r} does not exist.")
    sweep = yaml.safe_load(path.read_text()) or {}
    if sweep.get("method") != "grid":
        raise PPQConfigError(
            f"{path}: method={sweep.get('method')!r}; the local runner runs method: grid "
            "(random and bayes search need a W&B server: wandb sweep + wandb agent)."
        )
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise PPQConfigError(f"{path}: `parameters` must map parameter names to values.")
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ("values" in spec or "value" in spec):
            raise PPQConfigError(
                f"{path}: parameter {name!r} needs `values: [...]` or `value: ...` for a grid "
                f"(got {spec!r})."
            )
        if "values" in spec and not (isinstance(spec["values"], list) and spec["values"]):
            raise PPQConfigError(f"{path}: parameter {name!r}: `values` must be a non-empty list.")
    return sweep


def grid_points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, in file order (last parameter fastest)."""
    names = list(sweep["parameters"])
    choices = [
        spec["values"] if "values" in spec else [spec["value"]]
        for spec in sweep["parameters"].values()
    ]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def _format(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def agent_command(sweep: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The command a W&B agent runs for ``point``: ``command`` with its macros expanded.

    Raises:
        PPQConfigError: on a macro the local runner cannot expand.
    """
    command: list[str] = []
    for item in sweep.get("command", DEFAULT_COMMAND):
        item = str(item)
        if item == "${env}":
            command.append("/usr/bin/env")
        elif item == "${interpreter}":
            command.append("python")
        elif item == "${program}":
            if "program" not in sweep:
                raise PPQConfigError("the sweep's command uses ${program} but it has no `program`.")
            command.append(str(sweep["program"]))
        elif item == "${args}":
            command += [f"--{k}={_format(v)}" for k, v in point.items()]
        elif item == "${args_no_hyphens}":
            command += [f"{k}={_format(v)}" for k, v in point.items()]
        elif item.startswith("${"):
            raise PPQConfigError(
                f"command macro {item} is not supported by the local runner; use ${{env}}, "
                "${interpreter}, ${program}, ${args} or ${args_no_hyphens}."
            )
        else:
            command.append(item)
    if not set(command) & {"study", *RUNS}:
        raise PPQConfigError(
            "the local runner aggregates `ppq study` runs and `ppq fit|validate|test` runs of a "
            f"CompressionSchedule: the sweep's command must run one (got {' '.join(command)!r})."
        )
    return command


def point_row(command: list[str], folder: Path) -> tuple[list[str], Path, Any]:
    """The extra arguments that send a point's report to ``folder``, the report's path, and
    the function that turns the report into the point's result columns."""
    if "study" in command:
        return (
            ["--output_dir", str(folder), "--cells_dir", str(folder.parent.parent / "cells")],
            folder / "report.json",
            lambda report: report["studies"][0],
        )

    def schedule_result(report: dict[str, Any]) -> dict[str, Any]:
        last = report["stages"][-1]  # the model after the whole schedule
        dense = report["stages"][0] if report["stages"][0]["stage"] == "0_dense" else {}
        result = {"order": report["order"], **{f"dense_{k}": v for k, v in dense.items()}}
        return {**result, **{k: v for k, v in last.items() if k != "stage"}}

    return ["--report_dir", str(folder)], folder / "schedule.json", schedule_result


def run_sweep(path: str | Path, output: str | Path) -> list[dict[str, Any]]:
    """Run every grid point of the sweep file ``path`` into ``output``; return the table rows.

    A point whose command fails gets a row with its ``error`` (the end of its stderr; the whole
    log is in ``OUTPUT/points/NNN/log.txt``) and the sweep goes on; the table is written after
    the last point (:func:`failed_points` lists the failures).

    Raises:
        PPQConfigError: on a bad sweep file.
    """
    sweep = load_sweep(path)
    output = Path(output)
    points = grid_points(sweep)
    env = dict(os.environ)
    # the agent finds `ppq` on PATH; run the one of this Python's environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    rows = []
    for index, point in enumerate(tqdm(points, desc="sweep", unit="point")):
        folder = output / "points" / f"{index:03d}"
        command = agent_command(sweep, point)
        extra, report, result = point_row(command, folder)
        if not report.exists():
            folder.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(command + extra, capture_output=True, text=True, env=env)
            (folder / "command.txt").write_text(" ".join(command + extra) + "\n")
            (folder / "log.txt").write_text(done.stdout + done.stderr)
            if done.returncode:
                rows.append({"point": index, **point, "error": done.stderr.strip()[-500:]})
                continue
        rows.append({"point": index, **point, **result(json.loads(report.read_text()))})
    write_table(rows, output, "sweep")
    return rows


def failed_points(rows: list[dict[str, Any]]) -> list[int]:
    """The indices of the points of a sweep's rows that failed."""
    return [row["point"] for row in rows if "error" in row]
