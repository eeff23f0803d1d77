import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppq_lightning.callbacks import CompressionSchedule, MagnitudePruning, RTNQuantization
from ppq_lightning.loggers import WandbLogger, has_wandb_credentials
from tests.helpers import make_trainer


def test_credentials_detection(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not has_wandb_credentials()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_wandb_credentials()


def test_wandb_goes_offline_without_credentials_and_writes_a_run(
    monkeypatch, tmp_path, tiny_lm, tiny_data
):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(project="ppq-test", save_dir=str(tmp_path))
    assert logger._offline
    schedule = CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")],
        output_dir=str(tmp_path / "report"),
    )
    make_trainer(tmp_path, [schedule], logger=logger).validate(
        tiny_lm, datamodule=tiny_data, verbose=False
    )
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    assert {"stage/1_P/ppl", "stage/2_Q/measured_C", "val/ppl"} <= set(summary)
    # per-layer tables (a row per module: sparsity, bits, error ...) next to the scalars
    assert {"layers/1_P", "layers/2_Q"} <= set(summary)
    assert summary["layers/2_Q"]["_type"] == "table-file"
    runs = list(Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


OPEN_RUN = """
from ppq_lightning.loggers import WandbLogger
logger = WandbLogger(project="ppq-test", save_dir={save_dir!r})
logger.log_metrics({{"a": 1.0}})
{end}
"""


@pytest.mark.parametrize("end", ["", "raise RuntimeError('boom')"], ids=["exit", "crash"])
def test_an_open_offline_run_ends_without_terminal_escape_codes(tmp_path, end):
    """A run Lightning never finished used to get its closing notice from W&B's service
    process, with raw colour codes even in a log file; and Lightning's `anonymous=None` made
    W&B warn that the setting has no effect."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).parents[1]))
    script = OPEN_RUN.format(save_dir=str(tmp_path), end=end)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == (1 if end else 0), done.stderr
    output = done.stdout + done.stderr
    assert "\x1b" not in output, output
    assert "wandb sync" in output  # the notice itself is kept
    assert "anonymous" not in output
    (log,) = Path(tmp_path, "wandb").glob("offline-run-*/logs/debug.log")
    assert f"got exitcode: {1 if end else 0}" in log.read_text()  # a crash is a failed run


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No W&B variables, no credentials: what a fresh shell has."""
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_under_wandb_agent_the_logger_attaches_to_the_agents_run(wandb_env, tmp_path):
    """The run id, the folder and the run's own folder come from what `wandb agent` sets."""
    wandb_env.setenv("WANDB_SWEEP_ID", "sweep1")
    wandb_env.setenv("WANDB_RUN_ID", "agentrun1")
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "agent"))
    wandb_env.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="ppq-test")
    # known before the run starts: where config.yaml and the schedule's report go
    assert logger.version == "agentrun1"
    assert logger.log_dir == str(tmp_path / "agent" / "ppq-test" / "agentrun1")
    assert logger._wandb_init["id"] == "agentrun1"  # passed to wandb.init, not left to W&B
    logger.log_metrics({"m": 1.0})
    try:
        assert logger.experiment.id == "agentrun1"
        assert Path(logger.experiment.dir).is_relative_to(tmp_path / "agent" / "wandb")
    finally:
        logger.experiment.finish()


def test_without_an_agent_a_run_has_its_own_folder_under_outputs(wandb_env, tmp_path):
    wandb_env.chdir(tmp_path)
    logger = WandbLogger(project="ppq-test")
    assert logger.save_dir == "outputs" and logger.version is None and logger.log_dir is None
    logger.log_metrics({"m": 1.0})  # the run starts: its id names the folder
    try:
        assert logger.log_dir == os.path.join("outputs", "ppq-test", logger.experiment.id)
    finally:
        logger.experiment.finish()


def test_a_run_id_that_is_no_folder_name_is_refused(wandb_env):
    from ppq_lightning.errors import PPQConfigError

    wandb_env.setenv("WANDB_RUN_ID", "../x")
    with pytest.raises(PPQConfigError, match=r"WANDB_RUN_ID='../x' is not allowed: expected a"):
        WandbLogger(project="ppq-test")


def test_a_schedule_without_output_dir_reports_into_the_runs_folder(
    wandb_env, tmp_path, tiny_lm, tiny_data
):
    """Trainer.log_dir is a W&B logger's save_dir, shared by every run: schedule.json landed
    there, overwritten by the next run. The schedule also logs the model after the whole
    schedule as stage/final/*, the key a sweep over orders optimises."""
    wandb_env.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="ppq-test", save_dir=str(tmp_path))
    schedule = CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")],
        order="Q>P",
    )
    make_trainer(tmp_path, [schedule], logger=logger).validate(
        tiny_lm, datamodule=tiny_data, verbose=False
    )
    summary = dict(logger.experiment.summary)
    folder = tmp_path / "ppq-test" / logger.experiment.id
    logger.experiment.finish()
    report = json.loads((folder / "schedule.json").read_text())
    assert not (tmp_path / "schedule.json").exists()
    assert [r["stage"] for r in report["stages"]] == ["0_dense", "1_Q", "2_P"]
    assert summary["stage/final/ppl"] == pytest.approx(report["stages"][-1]["ppl"])
    assert summary["stage/final/sparsity"] == pytest.approx(0.5)
