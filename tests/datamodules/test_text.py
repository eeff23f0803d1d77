import pytest
import torch

from ppq_lightning.datamodules import TextDataModule
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import load_tokenizer


def _positions(haystack: torch.Tensor, needle: torch.Tensor) -> list[int]:
    windows = haystack.unfold(0, needle.numel(), 1)
    return torch.where((windows == needle).all(dim=1))[0].tolist()


def test_windows_and_disjoint_calibration(tiny_data):
    assert tiny_data.eval_windows.shape == (4, 64)
    calibration = tiny_data.calibration_windows()
    assert calibration.shape == (4, 64)
    # every calibration window is a slice of the train part; evaluation comes after it
    for window in calibration:
        assert _positions(tiny_data.train_tokens, window)
    batch = next(iter(tiny_data.val_dataloader()))
    assert set(batch) == {"input_ids"} and batch["input_ids"].dtype == torch.long
    assert len(list(tiny_data.calibration_dataloader())) == 4


def test_seeded_calibration_is_reproducible():
    a = TextDataModule(tokenizer="bytes", seqlen=32, num_calibration_samples=3, seed=1)
    b = TextDataModule(tokenizer="bytes", seqlen=32, num_calibration_samples=3, seed=1)
    c = TextDataModule(tokenizer="bytes", seqlen=32, num_calibration_samples=3, seed=2)
    assert torch.equal(a.calibration_windows(), b.calibration_windows())
    assert not torch.equal(a.calibration_windows(), c.calibration_windows())


def test_local_files_and_a_different_calibration_corpus(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    other = tmp_path / "b.txt"
    other.write_text("zzzz " * 400)
    data = TextDataModule(
        source="files",
        paths=[str(text)],
        tokenizer="bytes",
        seqlen=32,
        max_eval_windows=None,
        calibration_source="files",
        calibration_paths=[str(other)],
        num_calibration_samples=2,
    )
    assert data.eval_windows is None
    calibration = data.calibration_windows()
    assert data.eval_windows.shape[0] == int(1800 * 0.1) // 32
    assert set(calibration.flatten().tolist()) == set(load_tokenizer("bytes")("z ").input_ids[:2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "imagenet"}, "source='imagenet'"),
        ({"calibration_source": "nope"}, "calibration_source='nope'"),
        ({"seqlen": 1}, "seqlen=1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_calibration_samples": 0}, "num_calibration_samples=0"),
        ({"max_eval_windows": 0}, "max_eval_windows=0"),
        ({"eval_fraction": 1.0}, "eval_fraction=1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        TextDataModule(tokenizer="bytes", **kwargs)


def test_missing_files(tmp_path):
    with pytest.raises(PPQConfigError, match="paths"):
        TextDataModule(source="files", tokenizer="bytes").setup()
    with pytest.raises(PPQConfigError, match="existing text files"):
        TextDataModule(source="files", paths=[str(tmp_path / "x")], tokenizer="bytes").setup()


def test_corpus_too_short(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(PPQConfigError, match="too short for seqlen=64"):
        TextDataModule(source="files", paths=[str(short)], tokenizer="bytes", seqlen=64).setup()


def test_hub_corpus_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PPQConfigError, match=r"source='wikitext2'.*offline"):
        TextDataModule(source="wikitext2", tokenizer="bytes").setup()
