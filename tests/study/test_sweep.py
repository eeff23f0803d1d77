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

SMOKE = Path(__file__).parents[2] / "configs" / "sweeps" / "smoke.yaml"


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


def test_bad_commands(tmp_path):
    sweep = {"method": "grid", "parameters": {"a": {"value": 1}}}
    with pytest.raises(PPQConfigError, match=r"\$\{args_json\} is not supported"):
        agent_command({**sweep, "command": ["ppq", "study", "${args_json}"]}, {"a": 1})
    with pytest.raises(PPQConfigError, match="must run one"):
        agent_command({**sweep, "command": ["ppq", "predict", "${args}"]}, {"a": 1})
    with pytest.raises(PPQConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_smoke_sweep_runs_locally_one_row_per_point(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])  # the sweep's command names a repo config
    rows = run_sweep(SMOKE, tmp_path)
    assert [(r["order"], r["Q.bits"]) for r in rows] == [
        ("P>Q", 2),
        ("P>Q", 4),
        ("Q>P", 2),
        ("Q>P", 4),
    ]
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(float(r["ppl"]) > 1 for r in table)
    assert [r["best_order"] for r in table] == ["P>Q", "P>Q", "Q>P", "Q>P"]
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 4
    # the dense model is evaluated once for all points (shared cells)
    assert (
        sum(
            json.loads((tmp_path / "points" / r["id"] / "report.json").read_text())["studies"][0][
                "evaluations"
            ]
            for r in rows
        )
        == 5
    )
    again = run_sweep(SMOKE, tmp_path)  # finished points are not run again
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]


def test_fit_sweep_of_orders_with_fine_tuning_one_row_per_point(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])
    sweep = Path(__file__).parents[2] / "configs" / "sweeps" / "lora_orders.yaml"
    command = agent_command(load_sweep(sweep), {"order": "Q>L>P"})
    assert command[1:4] == ["ppq", "fit", "--config"] and command[-1] == "--order=Q>L>P"
    rows = run_sweep(sweep, tmp_path)
    assert [r["order"] for r in rows] == ["P>Q>L", "Q>L>P"]
    assert all(r["kind"] in ("L", "P") and r["ppl"] > 1 and r["dense_ppl"] > 1 for r in rows)
    assert rows[0]["kind"] == "L" and rows[1]["kind"] == "P"  # the last stage of each order
    # same stages in both orders: the same base sparsity, bits and adapters, so equal C
    assert rows[0]["measured_C"] == pytest.approx(rows[1]["measured_C"])
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


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
    result = main(["study", *args, "--output_dir", str(tmp_path)])
    assert result.search == "predict" and len(result.orders) == 1
    assert result.prediction["predictor"] == "interference" and result.budget.evaluations == 2


# -- reliability: stale points, failed points, corrupt files, orphans --------------------------
FAKE_STUDY = """
import json, os, sys, time
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
value = [a for a in args if a.startswith("--x=")][0][4:]
mode = os.environ.get("FAKE_MODE", "ok")
if mode == "sleep":
    open(os.path.join(os.environ["FAKE_PIDS"], str(os.getpid())), "w").close()
    time.sleep(120)
if mode != "no_report":
    with open(os.path.join(out, "report.json"), "w") as f:
        f.write("{" if mode == "truncated" else json.dumps({"studies": [{"seen": value}]}))
"""


def _fake_sweep(tmp_path, values, mode_file=None):
    script = tmp_path / "fake_study.py"
    script.write_text(FAKE_STUDY)
    return _write(
        tmp_path,
        method="grid",
        parameters={"x": {"values": values}},
        command=[sys.executable, str(script), "study", "${args}"],
    )


def test_an_edited_sweep_file_recomputes_its_points_and_never_relabels_old_ones(tmp_path):
    out = tmp_path / "out"
    first = run_sweep(_fake_sweep(tmp_path, [1, 2]), out)
    assert [(r["x"], r["seen"]) for r in first] == [(1, "1"), (2, "2")]
    second = run_sweep(_fake_sweep(tmp_path, [2, 3]), out)  # values edited: 2 kept, 3 is new
    assert [r["x"] for r in second] == [2, 3]
    assert [r["id"] for r in second] == [first[1]["id"], second[1]["id"]]
    assert second[1]["id"] not in {r["id"] for r in first}
    assert [r["seen"] for r in second] == ["2", "3"]  # each row is its own point's result


def test_editing_a_config_the_command_names_gives_a_new_point(tmp_path):
    from ppq_lightning.study.sweep import point_id

    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    before = point_id(["ppq", "study", "--config", str(config)])
    config.write_text("a: 2\n")
    assert point_id(["ppq", "study", "--config", str(config)]) != before
    assert point_id(["ppq", "study", f"--config={config}"]) != before


@pytest.mark.parametrize(
    ("mode", "error"),
    [("no_report", "exit code 0 but no report"), ("truncated", "unreadable report")],
)
def test_a_point_without_a_readable_report_is_failed_and_the_sweep_goes_on(
    tmp_path, monkeypatch, mode, error
):
    monkeypatch.setenv("FAKE_MODE", mode)
    rows = run_sweep(_fake_sweep(tmp_path, [1, 2]), tmp_path / "out")
    assert len(rows) == 2 and all(error in r["error"] for r in rows)
    monkeypatch.setenv("FAKE_MODE", "ok")  # fixed: the next run computes them
    rows = run_sweep(_fake_sweep(tmp_path, [1, 2]), tmp_path / "out")
    assert [r.get("error") for r in rows] == [None, None]


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
    assert again["seen"] == "1" and "error" not in again


def test_an_output_that_is_a_file_is_refused_before_any_point_runs(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cells").write_text("")
    with pytest.raises(PPQConfigError, match="cells' is a file"):
        run_sweep(_fake_sweep(tmp_path, [1]), tmp_path / "out")
    assert not (tmp_path / "out" / "points").exists()


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
