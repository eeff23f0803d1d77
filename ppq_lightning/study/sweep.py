"""Run a W&B sweep file locally: one ``ppq study`` (or ``ppq fit|validate|test``) run per grid
point, then one table.

The same file works with ``wandb sweep configs/sweeps/order_grid.yaml`` + ``wandb agent``: its
``command`` runs our CLI, and the parameters arrive as ``--order=P>Q --P.sparsity=0.5`` (W&B's
``${args}``), which ``ppq study`` reads as the order and stage overrides. Without a W&B server,

    ppq sweep configs/sweeps/smoke.yaml --output outputs/sweep_smoke

expands the grid into exactly the commands an agent would run, runs them one after another
(each point in ``OUTPUT/points/ID``, ``ID`` a hash of its command and of the config files it
names, all sharing the cell cache ``OUTPUT/cells``, so the dense model is evaluated once), and
writes ``OUTPUT/sweep.csv``, ``sweep.json`` and ``sweep.md``: one row per point, its parameters
and its results. Finished points are not run again; an edited point is a new point. A sweep file
runs the commands it names, as a W&B agent does: run only sweep files you trust.

A point that runs ``ppq fit|validate|test`` (a config with a ``CompressionSchedule``; the
parameters are LightningCLI arguments such as ``--order=Q>L>P``, ``--trainer.max_steps=60``)
gets ``--report_dir OUTPUT/points/ID``; its row is the schedule's final stage (ppl, C, ...)
with the dense model's metrics as ``dense_*`` (``configs/sweeps/lora_orders.yaml``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ppq_lightning.errors import PPQConfigError, check_folder
from ppq_lightning.reports import write_json, write_table, write_text_atomic
from ppq_lightning.study.children import run_child

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


def point_id(command: list[str]) -> str:
    """What identifies a grid point on disk: a hash of its full command and of the content of
    every file the command names (a config edited since keeps no stale result)."""
    digest = hashlib.sha256(json.dumps(command).encode())
    for item in command:
        candidate = Path(item.partition("=")[2] if item.startswith("--") else item)
        if candidate.suffix in (".yaml", ".yml", ".json") and candidate.is_file():
            digest.update(candidate.read_bytes())
    return digest.hexdigest()[:12]


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


def check_output(output: Path) -> None:
    """Refuse an output folder the runner cannot use, before any point runs.

    Raises:
        PPQConfigError: when ``output``, its ``points`` or ``cells`` folder is a file.
    """
    for path in (output / "points", output / "cells"):
        check_folder("--output", path)


def finished(folder: Path, command: list[str]) -> dict[str, Any] | None:
    """The result recorded in ``folder/point.json`` for exactly ``command``, else None (absent,
    unreadable or for another command: the point is run again, with a warning if unreadable)."""
    done = folder / "point.json"
    if not done.exists():
        return None
    try:
        record = json.loads(done.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        warnings.warn(f"{done} is unreadable ({error}); running the point again.", stacklevel=2)
        return None
    return record["result"] if record.get("command") == command else None


def run_point(command: list[str], folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one grid point into ``folder``; return its result columns or ``{"error": ...}``.

    ``folder/point.json`` (written atomically, last) marks the point done; ``command.txt`` holds
    the command as a shell would read it, ``log.txt`` its output.
    """
    extra, report, result = point_row(command, folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "command.txt", shlex.join(command + extra) + "\n")
    log = folder / "log.txt"
    try:
        code = run_child(command + extra, env, log)
    except OSError as error:  # the program is missing or not executable
        return {"error": f"cannot run {command[0]!r}: {error}"}
    if code:
        tail = log.read_text(errors="replace").strip()[-500:]
        return {"error": f"exit code {code}: {tail}"}
    try:
        row = result(json.loads(report.read_text()))
    except FileNotFoundError:
        return {"error": f"exit code 0 but no report at {report}"}
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        return {"error": f"unreadable report {report}: {error!r}"}
    write_json(folder / "point.json", {"command": command, "result": row})
    return row


def run_sweep(path: str | Path, output: str | Path) -> list[dict[str, Any]]:
    """Run every grid point of the sweep file ``path`` into ``output``; return the table rows.

    Each point runs in ``OUTPUT/points/ID`` (``ID``: :func:`point_id`, a hash of its command and
    the files it names), so a point whose parameters or config changed is computed afresh and
    a finished one is never relabelled. A point that fails (non-zero exit, a program that
    cannot start, no readable report) gets a row with its ``error`` (the end of its log; the
    whole of it is in ``OUTPUT/points/ID/log.txt``) and the sweep goes on; the table is
    written after the last point (:func:`failed_points` lists the failures).

    Raises:
        PPQConfigError: on a bad sweep file or an output path that is a file (before any
            point runs).
    """
    sweep = load_sweep(path)
    output = Path(output)
    check_output(output)
    points = grid_points(sweep)
    commands = [agent_command(sweep, point) for point in points]  # every macro checked first
    env = dict(os.environ)
    # the agent finds `ppq` on PATH; run the one of this Python's environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    rows = []
    for index, (point, command) in enumerate(
        tqdm(list(zip(points, commands, strict=True)), desc="sweep", unit="point")
    ):
        key = point_id(command)
        folder = output / "points" / key
        row = finished(folder, command)
        if row is None:
            row = run_point(command, folder, env)
        rows.append({"point": index, "id": key, **point, **row})
    write_table(rows, output, "sweep")
    return rows


def failed_points(rows: list[dict[str, Any]]) -> list[int]:
    """The indices of the points of a sweep's rows that failed."""
    return [row["point"] for row in rows if "error" in row]
