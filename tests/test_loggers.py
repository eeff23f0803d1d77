from pathlib import Path

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
