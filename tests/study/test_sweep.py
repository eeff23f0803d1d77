import csv
import json
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
            json.loads((tmp_path / "points" / f"{i:03d}" / "report.json").read_text())["studies"][
                0
            ]["evaluations"]
            for i in range(4)
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
