import csv
import json
from pathlib import Path

import pytest
import yaml

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.sweep import agent_command, grid_points, load_sweep, run_sweep

SMOKE = Path(__file__).parents[1] / "configs" / "sweeps" / "smoke.yaml"


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
    with pytest.raises(PPQConfigError, match="must run `ppq study"):
        agent_command({**sweep, "command": ["ppq", "validate", "${args}"]}, {"a": 1})
    with pytest.raises(PPQConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_smoke_sweep_runs_locally_one_row_per_point(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # the sweep's command names a repo config
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
            json.loads((tmp_path / "points" / f"{i:03d}" / "report.json").read_text())["studies"][
                0
            ]["evaluations"]
            for i in range(4)
        )
        == 5
    )
    again = run_sweep(SMOKE, tmp_path)  # finished points are not run again
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]
