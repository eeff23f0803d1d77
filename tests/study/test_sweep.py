import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.study.sweep import agent_command, grid_points, load_sweep, run_sweep

ROOT = Path(__file__).parents[2]
SMOKE = ROOT / "configs" / "sweeps" / "smoke.yaml"


def test_grid_expands_into_the_commands_a_wandb_agent_runs():
    sweep = load_sweep(SMOKE)
    points = grid_points(sweep)
    assert points == [
        {"order": o, "P.sparsity": 0.5, "Q.bits": b} for o in ("P>Q", "Q>P") for b in (2, 4)
    ]
    assert agent_command(sweep, points[1]) == [
        "/usr/bin/env",
        "ppq",
        "study",
        "--config",
        "configs/tiny/study.yaml",
        "--config",
        "configs/loggers/study_wandb.yaml",
        "--output_dir=outputs/sweep_smoke",
        "--order=P>Q",
        "--P.sparsity=0.5",
        "--Q.bits=4",
    ]


def _write(tmp_path, **sweep):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"method": "random", "parameters": {"a": {"values": [1]}}}, "method='random'"),
        ({"method": "grid"}, "`parameters` must map"),
        ({"method": "grid", "parameters": {"a": {"min": 0, "max": 1}}}, "parameter 'a' needs"),
        ({"method": "grid", "parameters": {"a": {"values": []}}}, "non-empty list"),
    ],
)
def test_bad_sweep_files(tmp_path, sweep, message):
    with pytest.raises(PPQConfigError, match=message):
        load_sweep(_write(tmp_path, **sweep))


GRID = "method: grid\nparameters: {order: {values: [P>Q]}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: grid\nparameters: {order: {values: [P>Q]}\n", r"not valid YAML: .* line 3"),
        ("method: grid\n  parameters: 1\n", r"not valid YAML: .* line 2, column 13"),
        ("- method: grid\n", "a list, not a mapping"),
        ("", "': empty; a W&B sweep file is a YAML mapping"),
        (GRID + "command: ppq study ${args}\n", r"command='ppq study \$\{args\}': expected a"),
        (GRID + "command: [ppq, [study]]\n", "expected a non-empty list of words"),
        (GRID + "program: [ppq]\n", "program=\\['ppq'\\]: expected the program's name"),
        (GRID + "metric: result/ppl\n", "metric='result/ppl': expected {name: KEY"),
        (GRID + "metric: {name: result/ppl, goal: lowest}\n", "goal='lowest': expected min"),
    ],
    ids=["yaml", "indent", "list", "empty", "command", "word", "program", "metric", "goal"],
)
def test_malformed_sweep_files_are_named_with_what_is_wrong_and_allowed(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(PPQConfigError, match=message) as info:
        load_sweep(path)
    assert str(path) in str(info.value)


def test_ppq_sweep_on_a_malformed_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    """It gave a raw yaml traceback and exit code 1."""
    from ppq_lightning.cli import entry

    path = tmp_path / "sweep.yaml"
    path.write_text("method: grid\nparameters: {order: {values: [P>Q]}\n")
    monkeypatch.setattr(sys, "argv", ["ppq", "sweep", str(path), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        entry()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ppq: error: sweep file {str(path)!r}: not valid YAML: ")
    assert "line 3, column 1; a W&B sweep file is a YAML mapping: method: grid" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_bad_commands(tmp_path):
    sweep = {"method": "grid", "parameters": {"a": {"value": 1}}}
    with pytest.raises(PPQConfigError, match=r"\$\{args_json_file\} is not supported"):
        agent_command({**sweep, "command": ["ppq", "study", "${args_json_file}"]}, {"a": 1})
    with pytest.raises(PPQConfigError, match="must run one"):
        agent_command({**sweep, "command": ["ppq", "predict", "${args}"]}, {"a": 1})
    with pytest.raises(PPQConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding the repo's configs (the sweep files name them relative to
    it), with W&B offline and no credentials."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(work)
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    return work


def test_a_local_sweep_runs_the_agent_command_and_tabulates_its_wandb_run(workspace):
    """A point of the smoke sweep: its row is what its W&B run reported (the sweep's metric
    `result/ppl` and the other `result/*`), it ran the agent's command unchanged (the runner
    appended --output_dir/--cells_dir) and wrote its report to its own folder."""
    sweep = yaml.safe_load(SMOKE.read_text())
    sweep["parameters"].update({"order": {"value": "Q>P"}, "Q.bits": {"value": 4}})
    path = workspace / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    out = workspace / "out"
    (row,) = run_sweep(path, out)
    assert "error" not in row and row["result/ppl"] > 1, row
    results = set(row) - {"point", "id", *sweep["parameters"]}
    assert "result/measured_C" in results and all(k.startswith("result/") for k in results)
    with open(out / "sweep.csv") as f:
        assert [float(r["result/ppl"]) for r in csv.DictReader(f)] == [row["result/ppl"]]
    point = {k: row[k] for k in sweep["parameters"]}
    command = (out / "points" / row["id"] / "command.txt").read_text()
    assert shlex.split(command) == agent_command(load_sweep(path), point)
    own = workspace / "outputs" / "sweep_smoke" / row["id"]  # the run id is the point's id
    study = json.loads((own / "report.json").read_text())["studies"][0]
    assert study["ppl"] == pytest.approx(row["result/ppl"]) and study["best_order"] == "Q>P"
    assert list((workspace / "outputs" / "sweep_smoke" / "cells").glob("*.json"))  # shared
    again = run_sweep(path, out)  # a finished point is not run again
    assert again == [row]


def test_a_sweep_point_can_predict_its_order(tmp_path):
    from ppq_lightning.cli.main import main

    sweep = load_sweep(SMOKE.with_name("predict_smoke.yaml"))
    point = grid_points(sweep)[1]
    assert point == {
        "search": "predict",
        "predictor": "interference",
        "P.sparsity": 0.5,
        "Q.bits": 4,
    }
    args = agent_command(sweep, point)[3:]  # what `ppq study` receives
    logger = args.index("configs/loggers/study_wandb.yaml")
    args = args[: logger - 1] + args[logger + 1 :]  # the same study, without W&B
    result = main(["study", *args, "--output_dir", str(tmp_path)])
    assert result.search == "predict" and len(result.orders) == 1
    assert result.prediction["predictor"] == "interference" and result.budget.evaluations == 2


# -- reliability: stale points, failed points, corrupt files, orphans --------------------------
# a program that reports to W&B as a run started by an agent does (wandb.init reads the
# agent's WANDB_DIR and WANDB_RUN_ID)
FAKE_STUDY = """
import os, sys, time
value = [a for a in sys.argv[1:] if a.startswith("--x=")][0][4:]
mode = os.environ.get("FAKE_MODE", "ok")
if mode == "sleep":
    open(os.path.join(os.environ["FAKE_PIDS"], str(os.getpid())), "w").close()
    time.sleep(120)
if mode != "no_run":
    import wandb
    run = wandb.init(project="fake")
    run.log({"fake/seen": value} if mode != "no_metric" else {"fake/other": 1.0})
    run.finish()
"""


def _fake_sweep(tmp_path, values, mode_file=None):
    script = tmp_path / "fake_study.py"
    script.write_text(FAKE_STUDY)
    return _write(
        tmp_path,
        method="grid",
        parameters={"x": {"values": values}},
        metric={"name": "fake/seen"},
        command=[sys.executable, str(script), "study", "${args}"],
    )


def test_an_edited_sweep_file_recomputes_its_points_and_never_relabels_old_ones(tmp_path):
    out = tmp_path / "out"
    first = run_sweep(_fake_sweep(tmp_path, [1, 2]), out)
    assert [(r["x"], r["fake/seen"]) for r in first] == [(1, "1"), (2, "2")]
    second = run_sweep(_fake_sweep(tmp_path, [2, 3]), out)  # values edited: 2 kept, 3 is new
    assert [r["x"] for r in second] == [2, 3]
    assert [r["id"] for r in second] == [first[1]["id"], second[1]["id"]]
    assert second[1]["id"] not in {r["id"] for r in first}
    assert [r["fake/seen"] for r in second] == ["2", "3"]  # each row is its own point's


def test_editing_a_config_the_command_names_gives_a_new_point(tmp_path):
    from ppq_lightning.study.sweep import point_id

    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    before = point_id(["ppq", "study", "--config", str(config)])
    config.write_text("a: 2\n")
    assert point_id(["ppq", "study", "--config", str(config)]) != before
    assert point_id(["ppq", "study", f"--config={config}"]) != before


@pytest.mark.parametrize(
    ("mode", "values", "error"),
    [
        ("no_run", [1, 2], "exit code 0 but no W&B run"),
        ("no_metric", [1], "never reported the sweep's metric 'fake/seen' (so W&B would not"),
    ],
)
def test_a_point_whose_run_reports_no_metric_is_failed_and_the_sweep_goes_on(
    tmp_path, monkeypatch, mode, values, error
):
    monkeypatch.setenv("FAKE_MODE", mode)
    rows = run_sweep(_fake_sweep(tmp_path, values), tmp_path / "out")
    assert len(rows) == len(values) and all(error in r["error"] for r in rows)
    monkeypatch.setenv("FAKE_MODE", "ok")  # fixed: the next run computes them
    rows = run_sweep(_fake_sweep(tmp_path, values), tmp_path / "out")
    assert [r.get("error") for r in rows] == [None] * len(values)


def test_a_missing_program_is_a_failed_point(tmp_path):
    sweep = _write(
        tmp_path,
        method="grid",
        parameters={"x": {"values": [1]}},
        command=[str(tmp_path / "nope"), "study", "${args}"],
    )
    (row,) = run_sweep(sweep, tmp_path / "out")
    assert "cannot run" in row["error"] and "nope" in row["error"]


def test_a_corrupt_done_marker_is_recomputed_with_a_warning(tmp_path):
    out = tmp_path / "out"
    (row,) = run_sweep(_fake_sweep(tmp_path, [1]), out)
    (out / "points" / row["id"] / "point.json").write_text('{"comm')
    with pytest.warns(UserWarning, match="point.json is unreadable"):
        (again,) = run_sweep(_fake_sweep(tmp_path, [1]), out)
    assert again["fake/seen"] == "1" and "error" not in again


def test_an_output_that_is_a_file_is_refused_before_any_point_runs(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "points").write_text("")
    with pytest.raises(PPQConfigError, match="points' is a file"):
        run_sweep(_fake_sweep(tmp_path, [1]), tmp_path / "out")
    assert (tmp_path / "out" / "points").read_text() == ""


def test_command_txt_is_shell_safe(tmp_path):
    (row,) = run_sweep(_fake_sweep(tmp_path, ["$(touch pwned)"]), tmp_path / "out")
    text = (tmp_path / "out" / "points" / row["id"] / "command.txt").read_text()
    assert shlex.split(text)[3] == "--x=$(touch pwned)"
    subprocess.run(["bash", "-c", f": {text}"], cwd=tmp_path, check=True)  # replayed as words
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_sweep_leaves_no_orphan(tmp_path, signum):
    pids = tmp_path / "pids"
    pids.mkdir()
    sweep = _fake_sweep(tmp_path, [1])
    code = (
        "import sys; from ppq_lightning.study.sweep import run_sweep; "
        f"run_sweep({str(sweep)!r}, {str(tmp_path / 'out')!r})"
    )
    env = {**os.environ, "FAKE_MODE": "sleep", "FAKE_PIDS": str(pids)}
    runner = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not list(pids.iterdir()):
        assert time.monotonic() < deadline and runner.poll() is None
        time.sleep(0.1)
    child = int(next(pids.iterdir()).name)
    runner.send_signal(signum)
    runner.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, f"the point {child} outlived its sweep"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as dead
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
