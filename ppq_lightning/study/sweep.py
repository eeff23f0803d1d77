"""Run a W&B sweep file locally, as ``wandb agent`` runs it, and tabulate what each run reported
to W&B.

The same file works with ``wandb sweep configs/sweeps/smoke.yaml`` + ``wandb agent``: its
``command`` runs our CLI with a W&B logger config, and the parameters arrive as
``--order=P>Q --P.sparsity=0.5`` (W&B's ``${args}``), which ``ppq study`` reads as the order and
stage overrides (``ppq fit|validate|test`` as LightningCLI arguments). Without a W&B server,

    ppq sweep configs/sweeps/smoke.yaml --output outputs/sweep_smoke

expands the grid into exactly the commands an agent runs (:func:`agent_command`, checked
against wandb's own expansion in the tests) and runs them one after another, each with the
environment an agent gives a run: ``WANDB_RUN_ID`` (the point's ``ID``, a hash of its command
and of the config files it names), ``WANDB_DIR=OUTPUT/points/ID``, ``WANDB_SWEEP_PARAM_PATH``
(the point's values, in the file format the agent writes) and ``WANDB_MODE=offline``. Each
point's W&B run is then read back with wandb's own reader (``wandb leet inspect --summary``; a
``wandb-summary.json`` when the run has one), and ``OUTPUT/sweep.csv``, ``sweep.json`` and
``sweep.md`` get one row per point: its parameters, the sweep's ``metric`` and the other values
the run reported beside it (``result/*`` for ``metric: {name: result/ppl}``). A point whose run
never reported the sweep's metric is a failed point: under an agent, W&B would not see it either.

Where a point's own files go is the command's business, as under an agent: with
``WANDB_RUN_ID`` set, ``ppq study`` writes its report to ``OUTPUT_DIR/RUN_ID`` (cells shared in
``OUTPUT_DIR/cells``) and ``ppq fit|validate|test`` to the W&B logger's run folder
``SAVE_DIR/PROJECT/RUN_ID`` (``SAVE_DIR``: ``WANDB_DIR``, here ``OUTPUT/points/ID``).

Finished points (``OUTPUT/points/ID/point.json``) are not run again; an edited point is a new
point. A sweep file runs the commands it names, as a W&B agent does: run only sweep files you
trust. Not reproduced: ``WANDB_SWEEP_ID`` (there is no sweep on a server; the offline runs stay
plain runs that ``wandb sync`` uploads), ``method: random|bayes`` (they need the server).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ppq_lightning.errors import PPQConfigError, check_folder
from ppq_lightning.reports import write_json, write_table, write_text_atomic
from ppq_lightning.study.children import run_child
from ppq_lightning.yaml_numbers import load_yaml

# wandb/wandb_agent.py: Agent.DEFAULT_SWEEP_COMMAND and SWEEP_COMMAND_ENV_VAR_REGEX
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENVVAR = re.compile(r"\$\{envvar\:([A-Z0-9_]*)\}")
RUNS = ("study", "fit", "validate", "test")
ARGUMENT_MACROS = (
    "args",
    "args_no_equals",
    "args_no_hyphens",
    "args_no_boolean_flags",
    "args_json",
    "args_append_hydra",
    "args_override_hydra",
)
MACROS = ("env", "interpreter", "program", *ARGUMENT_MACROS)
GOALS = ("minimize", "maximize")
SHAPE = (
    "a W&B sweep file is a YAML mapping: method: grid, parameters: {NAME: {values: [...]} or "
    "{value: ...}}, command: [...] (its words, with W&B's ${...} macros), and optionally "
    "program: NAME, metric: {name: KEY, goal: minimize|maximize}, name, description"
)
LOCAL_SWEEP = "sweep-local"  # the agent's wandb/sweep-<sweep id>/ folder under WANDB_DIR
READ_TIMEOUT = 300


def _bad(path: Path, what: str) -> PPQConfigError:
    return PPQConfigError(f"sweep file {str(path)!r}: {what}")


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``.

    Raises:
        PPQConfigError: when it is missing, not a readable text file, or not YAML.
    """
    if not path.exists():
        raise PPQConfigError(f"sweep file {str(path)!r} does not exist.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise _bad(path, f"cannot be read as a text file ({error}); {SHAPE}.") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise _bad(path, f"not valid YAML: {problem}{where}; {SHAPE}.") from None


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a W&B sweep file for local grid runs.

    Args:
        path: the sweep YAML file.

    Returns:
        The sweep, as a dict.

    Raises:
        PPQConfigError: naming the file, what is wrong and what is allowed: a missing or
            unreadable file, text that is not YAML or not a mapping, a method other than grid,
            a parameter without values, a ``command`` that is not a list of words, a
            ``program`` that is not a string, a ``metric`` without a ``name`` or with a
            ``goal`` other than minimize/maximize.
    """
    path = Path(path)
    sweep = _read_yaml(path)
    if sweep is None:
        raise _bad(path, f"empty; {SHAPE}.")
    if not isinstance(sweep, dict):
        raise _bad(path, f"a {type(sweep).__name__}, not a mapping; {SHAPE}.")
    if sweep.get("method") != "grid":
        raise PPQConfigError(
            f"{path}: method={sweep.get('method')!r}; the local runner runs method: grid "
            "(random and bayes search need a W&B server: wandb sweep + wandb agent)."
        )
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise PPQConfigError(f"{path}: `parameters` must map parameter names to values.")
    for name, spec in parameters.items():
        if not isinstance(name, str):
            raise _bad(path, f"parameter name {name!r} is not a string.")
        if not isinstance(spec, dict) or not ("values" in spec or "value" in spec):
            raise PPQConfigError(
                f"{path}: parameter {name!r} needs `values: [...]` or `value: ...` for a grid "
                f"(got {spec!r})."
            )
        if "values" in spec and not (isinstance(spec["values"], list) and spec["values"]):
            raise PPQConfigError(f"{path}: parameter {name!r}: `values` must be a non-empty list.")
    command = sweep.get("command")
    words = (str, int, float)
    if command is not None and not (
        isinstance(command, list)
        and command
        and all(isinstance(w, words) and not isinstance(w, bool) for w in command)
    ):
        raise _bad(path, f"command={command!r}: expected a non-empty list of words; {SHAPE}.")
    if "program" in sweep and not isinstance(sweep["program"], str):
        raise _bad(path, f"program={sweep['program']!r}: expected the program's name.")
    metric = sweep.get("metric")
    if metric is not None:
        if not (isinstance(metric, dict) and isinstance(metric.get("name"), str)):
            raise _bad(path, f"metric={metric!r}: expected {{name: KEY, goal: minimize|maximize}}.")
        if metric.get("goal", "minimize") not in GOALS:
            raise _bad(path, f"metric goal={metric['goal']!r}: expected minimize or maximize.")
    return sweep


def sweep_metric(sweep: dict[str, Any]) -> str | None:
    """The summary key the sweep optimises (``metric.name``), if it names one."""
    metric = sweep.get("metric")
    return metric["name"] if isinstance(metric, dict) else None


def grid_points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, in file order (last parameter fastest)."""
    names = list(sweep["parameters"])
    choices = [
        spec["values"] if "values" in spec else [spec["value"]]
        for spec in sweep["parameters"].values()
    ]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def argument_macros(point: dict[str, Any]) -> dict[str, list[str]]:
    """What each of W&B's argument macros expands to for ``point``, as wandb's
    ``create_sweep_command_args`` (``wandb/sdk/launch/sweeps/utils.py``) writes them: a value
    is formatted by Python's ``str`` (``--Q.bits=4``, ``--flag=True``)."""
    macros: dict[str, list[str]] = {name: [] for name in ARGUMENT_MACROS}
    for name, value in point.items():
        flag = f"{name}={value}"
        macros["args"].append(f"--{flag}")
        macros["args_no_equals"] += [f"--{name}", str(value)]
        macros["args_no_hyphens"].append(flag)
        macros["args_append_hydra"].append(f"+{flag}")
        macros["args_override_hydra"].append(f"++{flag}")
        if not isinstance(value, bool):
            macros["args_no_boolean_flags"].append(f"--{flag}")
        elif value:
            macros["args_no_boolean_flags"].append(f"--{name}")
    macros["args_json"] = [json.dumps(point)]
    return macros


def _environment_macros(item: str, environ: dict[str, str]) -> str:
    """``${envvar:NAME}`` replaced by the variable's value (by ``NAME`` when unset), as wandb's
    ``create_sweep_command`` does."""
    return ENVVAR.sub(lambda m: environ.get(m.group(1), m.group(1)), item)


def agent_command(
    sweep: dict[str, Any], point: dict[str, Any], environ: dict[str, str] | None = None
) -> list[str]:
    """The command a W&B agent runs for ``point``: ``command`` (default ``${env}
    ${interpreter} ${program} ${args}``) with its macros expanded as ``wandb agent`` expands
    them (``wandb/wandb_agent.py``: ``Agent._command_run``).

    Args:
        sweep: the sweep (:func:`load_sweep`).
        point: one grid point (:func:`grid_points`).
        environ: the environment ``${envvar:NAME}`` reads; None for ``os.environ``.

    Raises:
        PPQConfigError: on a macro the local runner cannot expand (``${args_json_file}`` names
            a file per agent run; ``${args_dict}``; an unknown one, which the agent would
            silently drop), ``${program}`` without a ``program``, or a command that runs none
            of ``ppq study|fit|validate|test``.
    """
    environ = dict(os.environ if environ is None else environ)
    expansions: dict[str, list[str]] = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        **argument_macros(point),
    }
    if "program" in sweep:
        expansions["program"] = [str(sweep["program"])]
    command: list[str] = []
    for item in sweep.get("command") or DEFAULT_COMMAND:
        item = _environment_macros(str(item), environ)
        if not (item.startswith("${") and item.endswith("}")):
            command.append(item)
            continue
        name = item[2:-1]
        if name == "program" and "program" not in expansions:
            raise PPQConfigError("the sweep's command uses ${program} but it has no `program`.")
        if name not in expansions:
            raise PPQConfigError(
                f"command macro {item} is not supported by the local runner; use "
                f"{', '.join('${' + m + '}' for m in MACROS)} or ${{envvar:NAME}}."
            )
        command += expansions[name]
    if not set(command) & set(RUNS):
        raise PPQConfigError(
            "the local runner reads the W&B runs of `ppq study` and `ppq fit|validate|test`: "
            f"the sweep's command must run one (got {' '.join(command)!r})."
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


def check_output(output: Path) -> None:
    """Refuse an output folder the runner cannot use, before any point runs.

    Raises:
        PPQConfigError: when ``output`` or its ``points`` folder is a file.
    """
    check_folder("--output", output / "points")


def finished(folder: Path, command: list[str]) -> dict[str, Any] | None:
    """The W&B summary recorded in ``folder/point.json`` for exactly ``command``, else None
    (absent, unreadable, from an older runner, or for another command: the point is run
    again, with a warning if unreadable)."""
    done = folder / "point.json"
    if not done.exists():
        return None
    try:
        record = json.loads(done.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        warnings.warn(f"{done} is unreadable ({error}); running the point again.", stacklevel=2)
        return None
    if not isinstance(record, dict) or record.get("command") != command:
        return None
    summary = record.get("summary")
    return summary if isinstance(summary, dict) else None


def agent_environment(
    base: dict[str, str], folder: Path, run_id: str, point: dict[str, Any]
) -> dict[str, str]:
    """The environment ``wandb agent`` gives a run, for a point run offline in ``folder``:
    ``WANDB_DIR``, ``WANDB_RUN_ID``, ``WANDB_SWEEP_PARAM_PATH`` (the point's values written
    where and as the agent writes them: ``WANDB_DIR/wandb/sweep-ID/config-RUN.yaml``) and
    ``WANDB_MODE=offline``; ``WANDB_SWEEP_ID`` is removed (no sweep exists on a server).

    Args:
        base: the runner's environment.
        folder: the point's folder (its ``WANDB_DIR``).
        run_id: the point's W&B run id.
        point: the point's parameter values.
    """
    params = folder / "wandb" / LOCAL_SWEEP / f"config-{run_id}.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    values = {name: {"value": value} for name, value in point.items()}
    write_text_atomic(params, "wandb_version: 1\n\n" + yaml.safe_dump(values, sort_keys=False))
    env = {k: v for k, v in base.items() if k != "WANDB_SWEEP_ID"}
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(folder.resolve()),
        WANDB_RUN_ID=run_id,
        WANDB_SWEEP_PARAM_PATH=str(params.resolve()),
    )
    return env


def wandb_runs(folder: Path, run_id: str) -> set[Path]:
    """The W&B run folders of ``run_id`` under ``folder/wandb`` (one per attempt)."""
    return {p for p in (folder / "wandb").glob(f"*run-*-{run_id}") if p.is_dir()}


def read_summary(run: Path) -> dict[str, Any]:
    """The summary of the W&B run in the folder ``run`` (``.../wandb/offline-run-*``): its
    ``files/wandb-summary.json`` when W&B wrote one, else what wandb's reader of the run's
    ``.wandb`` transaction log gives (``wandb leet inspect --summary --json``).

    Args:
        run: the run's folder.

    Raises:
        RuntimeError: when neither can be read.
    """
    written = run / "files" / "wandb-summary.json"
    if written.is_file():
        return json.loads(written.read_text())
    reader = [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run)]
    done = subprocess.run(reader, capture_output=True, text=True, timeout=READ_TIMEOUT)
    try:
        return json.loads(done.stdout)["summary"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RuntimeError(
            f"cannot read the W&B run {run} with `{shlex.join(reader)}` (exit code "
            f"{done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
        ) from None


def scalars(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers and strings of a W&B summary, W&B's own ``_runtime``/``_step``/... left out
    (tables and images are dicts there)."""
    return {
        k: v
        for k, v in summary.items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool))
    }


def result_columns(summary: dict[str, Any], metric: str | None) -> dict[str, Any]:
    """A point's result columns: the sweep's ``metric`` and the values the run reported beside
    it (the keys with the same parent: ``result/*`` for ``result/ppl``); every value without a
    metric; ``{"error": ...}`` when the run never reported the metric.

    Args:
        summary: the run's summary (:func:`scalars`).
        metric: the sweep's ``metric.name``, if it has one.
    """
    if metric is None:
        return dict(summary)
    if metric not in summary:
        reported = ", ".join(sorted(summary)) or "nothing"
        return {
            "error": f"the run never reported the sweep's metric {metric!r} (so W&B would not "
            f"see it either); it reported: {reported}"
        }
    parent = metric.rpartition("/")[0]
    return {k: v for k, v in summary.items() if k.rpartition("/")[0] == parent}


def run_point(
    command: list[str],
    point: dict[str, Any],
    folder: Path,
    env: dict[str, str],
    metric: str | None,
) -> tuple[dict[str, Any], str | None]:
    """Run one grid point as an agent would, its W&B run in ``folder``.

    ``folder/point.json`` (written atomically, last, only when the run reported the sweep's
    metric) marks the point done; ``command.txt`` holds the command as a shell would read it,
    ``log.txt`` its output.

    Args:
        command: the point's agent command (:func:`agent_command`).
        point: the point's parameter values.
        folder: the point's folder, ``OUTPUT/points/ID`` (``ID`` is its W&B run id).
        env: the runner's environment (:func:`agent_environment` adds the agent's variables).
        metric: the sweep's ``metric.name``, if it has one.

    Returns:
        The run's summary (:func:`scalars`) and None, or ``{}`` and why the point failed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    run_id = folder.name
    write_text_atomic(folder / "command.txt", shlex.join(command) + "\n")
    log = folder / "log.txt"
    before = wandb_runs(folder, run_id)
    try:
        code = run_child(command, agent_environment(env, folder, run_id, point), log)
    except OSError as error:  # the program is missing or not executable
        return {}, f"cannot run {command[0]!r}: {error}"
    if code:
        tail = log.read_text(errors="replace").strip()[-500:]
        return {}, f"exit code {code}: {tail}"
    new = sorted(wandb_runs(folder, run_id) - before)
    if not new:
        return {}, (
            f"exit code 0 but no W&B run {run_id} under {folder / 'wandb'}: the command must "
            "log to W&B with a logger that writes where WANDB_DIR says "
            "(ppq_lightning.loggers.WandbLogger without save_dir: --config "
            "configs/loggers/wandb.yaml, or configs/loggers/study_wandb.yaml for ppq study)"
        )
    try:
        summary = scalars(read_summary(new[-1]))
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as error:
        return {}, str(error)
    if "error" not in result_columns(summary, metric):
        write_json(folder / "point.json", {"command": command, "summary": summary})
    return summary, None


def run_sweep(path: str | Path, output: str | Path) -> list[dict[str, Any]]:
    """Run every grid point of the sweep file ``path`` into ``output``; return the table rows.

    Each point runs its agent command (:func:`agent_command`) with its W&B run in
    ``OUTPUT/points/ID`` (``ID``: :func:`point_id`, also its W&B run id), so a point whose
    parameters or config changed is computed afresh and a finished one is never relabelled.
    A point that fails (non-zero exit, a program that cannot start, no W&B run, no sweep
    metric in it) gets a row with its ``error`` (the end of its log; the whole of it is in
    ``OUTPUT/points/ID/log.txt``) and the sweep goes on; the table is written after the last
    point (:func:`failed_points` lists the failures).

    Args:
        path: the sweep file (:func:`load_sweep`).
        output: the folder of the points (``points/ID``) and of ``sweep.csv|json|md``.

    Returns:
        One row per grid point: ``point`` (its index), ``id``, its values, and its result
        columns (:func:`result_columns`) or its ``error``.

    Raises:
        PPQConfigError: on a bad sweep file or an output path that is a file (before any
            point runs).
    """
    sweep = load_sweep(path)
    output = Path(output)
    check_output(output)
    metric = sweep_metric(sweep)
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
        summary, error = finished(folder, command), None
        if summary is None:
            summary, error = run_point(command, point, folder, env, metric)
        columns = {"error": error} if error else result_columns(summary, metric)
        rows.append({"point": index, "id": key, **point, **columns})
    write_table(rows, output, "sweep")
    return rows


def failed_points(rows: list[dict[str, Any]]) -> list[int]:
    """The indices of the points of a sweep's rows that failed."""
    return [row["point"] for row in rows if "error" in row]
