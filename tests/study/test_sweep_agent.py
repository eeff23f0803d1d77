"""The sweep files under ``wandb agent``: each file's command is built by wandb's own agent code
(``wandb.wandb_agent.Agent._command_run``, its process start captured), run for one point with
the environment the agent gives it (offline, a temporary ``WANDB_DIR``), and the sweep's metric
is read back from the offline run with wandb's own reader of the run's ``.wandb`` log."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppq_lightning.study.sweep import agent_command, agent_environment, grid_points, load_sweep

ROOT = Path(__file__).parents[2]
SWEEP_FILES = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
# the one sweep file on SmolLM2 runs its test point on the tiny model of the other files
TINY = {"configs/study/smollm2_order.yaml": "configs/tiny/study.yaml"}
SWEEP_ID = "localtestsweep"


def wandb_agent_launch(monkeypatch, sweep: dict, point: dict, run_id: str):
    """The command and environment ``wandb agent`` starts for ``point`` as run ``run_id``: the
    agent's own ``_command_run``, with the process it would start captured instead."""
    from wandb import wandb_agent

    launched = {}

    class Captured:
        def __init__(self, command=None, env=None, **kwargs):
            launched.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Captured)
    # what _command_run sets in os.environ, restored after the test
    monkeypatch.setenv("WANDB_RUN_ID", "")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=SWEEP_ID)
    agent._sweep_command = list(sweep["command"])  # as Agent.run reads it from the sweep
    agent._command_run(
        {
            "run_id": run_id,
            "program": sweep.get("program"),
            "args": {name: {"value": value} for name, value in point.items()},
        }
    )
    return launched["command"], launched["env"]


@pytest.fixture
def agent_env(monkeypatch, tmp_path):
    """What `wandb agent` sees in a shell without credentials: offline, its WANDB_DIR, a
    sweep id; the tests' working directory is a fresh folder that holds the repo's configs."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(work)
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SWEEP_ID", SWEEP_ID)
    (tmp_path / "wandb_dir").mkdir()
    return work


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_ppq_sweep_runs_exactly_the_command_wandb_agent_runs(path, agent_env, monkeypatch):
    sweep = load_sweep(path)
    for index, point in enumerate(grid_points(sweep)):
        command, env = wandb_agent_launch(monkeypatch, sweep, point, f"run{index}")
        assert agent_command(sweep, point) == command
        # the point's values reach the run as the agent writes them (WANDB_SWEEP_PARAM_PATH)
        ours = agent_environment({}, agent_env / f"p{index}", f"run{index}", point)
        assert Path(ours["WANDB_SWEEP_PARAM_PATH"]).read_text() == (
            Path(env["WANDB_SWEEP_PARAM_PATH"]).read_text()
        )


def test_every_macro_expands_as_the_agent_expands_it(agent_env, monkeypatch):
    """Values of every type, every macro of wandb's agent: the old local runner wrote dicts and
    lists of strings as JSON (`["P", "Q"]` where the agent writes `['P', 'Q']`) and refused
    all but five macros."""
    monkeypatch.setenv("PPQ_TEST_CONFIG", "configs/tiny/study.yaml")
    command = [
        "${env}",
        "${interpreter}",
        "${program}",
        "study",
        "--config=${envvar:PPQ_TEST_CONFIG}",
        "${envvar:PPQ_TEST_UNSET}",
        *(f"${{{m}}}" for m in ("args", "args_no_equals", "args_no_hyphens")),
        *(f"${{{m}}}" for m in ("args_no_boolean_flags", "args_json")),
        *(f"${{{m}}}" for m in ("args_append_hydra", "args_override_hydra")),
    ]
    point = {"a": 0.5, "b": [8, 4], "c": True, "d": False, "e": "Q>P", "f": None, "g": ["P", "Q"]}
    sweep = {"program": "ppq", "command": command, "parameters": {}}
    expected, _ = wandb_agent_launch(monkeypatch, sweep, point, "macros")
    assert agent_command(sweep, point) == expected
    assert "--g=['P', 'Q']" in expected and "configs/tiny/study.yaml" in expected[4]


def _wandb_summary(run_dir: Path) -> dict:
    """What wandb's own reader of a run's transaction log reports (`wandb leet inspect`)."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_a_sweep_point_under_wandb_agent_reports_the_metric_to_its_run(
    path, agent_env, monkeypatch, tmp_path
):
    """Under a real agent no metric reached W&B: no sweep file configured a W&B logger, the
    LoRA sweep optimised `val/ppl`, which `ppq fit` never logs, and every point wrote its
    report into the same folder."""
    sweep = load_sweep(path)
    point = grid_points(sweep)[0]
    run_id = "pt" + path.stem.replace("_", "")[:10]
    command, env = wandb_agent_launch(monkeypatch, sweep, point, run_id)
    command = [TINY.get(word, word) for word in command]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        command, cwd=agent_env, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    wandb_dir = Path(env["WANDB_DIR"])
    (run_dir,) = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}")
    run = _wandb_summary(run_dir)
    assert run["run_id"] == run_id and run["state"] == "finished"
    metric = sweep["metric"]["name"]
    value = run["summary"].get(metric)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 1, (
        f"{metric} not in the run's summary: {sorted(k for k in run['summary'] if '/' in k)[:40]}"
    )
    assert point.items() <= run["config"].items()  # the agent's values reached the run

    # the point's own files are in a folder named by the agent's run id
    if "study" in command:
        (output,) = [w.split("=", 1)[1] for w in command if w.startswith("--output_dir=")]
        report = json.loads((agent_env / output / run_id / "report.json").read_text())
        assert report["studies"][0][metric.split("/")[1]] == pytest.approx(value)
        assert not (agent_env / output / "report.json").exists()
        assert (agent_env / output / "cells").is_dir()  # shared by the sweep's points
    else:
        folder = wandb_dir / "ppq-lightning" / run_id
        report = json.loads((folder / "schedule.json").read_text())
        assert report["order"] == point["order"]
        assert report["stages"][-1]["ppl"] == pytest.approx(value)
        assert yaml.safe_load((folder / "config.yaml").read_text())["order"] == point["order"]
        assert not (wandb_dir / "schedule.json").exists()
        assert not (wandb_dir / "config.yaml").exists()
