import importlib.util
import math
import sys

import pytest
import torch

from ppq_lightning.datamodules import TextDataModule
from ppq_lightning.datamodules.text import pydoc_text
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models.loading import load_tokenizer
from tests.helpers import make_trainer


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
        ({"eval_fraction": 0}, "eval_fraction=0"),
        ({"max_eval_windows": 2.5}, "max_eval_windows=2.5"),
        ({"source": "files"}, "paths=None"),
        ({"source": "files", "paths": "a.txt"}, "paths='a.txt'"),
        ({"calibration_source": "files"}, "calibration_paths=None"),
        ({"max_eval_windows": True}, "max_eval_windows=True"),
        ({"seqlen": True}, "seqlen=True"),
        ({"seed": "x"}, "seed='x'"),
        ({"seed": True}, "seed=True"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"tokenizer": 3}, "tokenizer=3"),
        ({"tokenizer": ""}, "tokenizer=''"),
        ({"paths": ["a.txt"]}, r"paths=\['a.txt'\] .*source='pydoc'"),
        ({"calibration_paths": ["a.txt"]}, r"calibration_paths=\['a.txt'\] .*None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        TextDataModule(**{"tokenizer": "bytes", **kwargs})


def test_missing_files(tmp_path):
    with pytest.raises(PPQConfigError, match="paths"):
        TextDataModule(source="files", tokenizer="bytes").setup()
    with pytest.raises(PPQConfigError, match="existing text files"):
        TextDataModule(source="files", paths=[str(tmp_path / "x")], tokenizer="bytes").setup()
    with pytest.raises(PPQConfigError, match=r"calibration_paths=\[.*existing text files"):
        TextDataModule(calibration_source="files", calibration_paths=[str(tmp_path / "y")])


@pytest.mark.parametrize("argument", ["paths", "calibration_paths"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, argument):
    good = tmp_path / "good.txt"
    good.write_text("plain text. " * 200)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100)
    kwargs = {"source": "files", "paths": [str(good), str(bad)]}
    if argument == "calibration_paths":
        kwargs = {"calibration_source": "files", "calibration_paths": [str(bad)]}
    data = TextDataModule(tokenizer="bytes", seqlen=32, **kwargs)
    with pytest.raises(
        PPQConfigError, match=rf"{argument}: the file '{bad}' is not UTF-8 text: byte 0xe9"
    ):
        data.setup()


def test_corpus_too_short(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(
        PPQConfigError, match="too short for seqlen=64: 1 evaluation and 3 calibration"
    ):
        TextDataModule(source="files", paths=[str(short)], tokenizer="bytes", seqlen=64).setup()
    text = tmp_path / "text.txt"
    text.write_text("x" * 1000)  # 100 evaluation tokens; calibration: int(0.9 * (10 * 4 + 9 * 2))
    with pytest.raises(PPQConfigError, match="100 evaluation and 52 calibration"):
        TextDataModule(
            source="files",
            paths=[str(text)],
            tokenizer="bytes",
            seqlen=64,
            calibration_source="files",
            calibration_paths=[str(short)] * 10,
        ).setup()


def test_eval_part_follows_train_part_and_window_counts(tiny_data):
    full = torch.tensor(
        load_tokenizer("bytes").encode(pydoc_text(), add_special_tokens=False, verbose=False)
    )
    cut = int(len(full) * 0.9)
    assert torch.equal(tiny_data.train_tokens, full[:cut])
    assert torch.equal(tiny_data.eval_windows.flatten(), full[cut : cut + 4 * 64])
    for window in tiny_data.calibration_windows():  # at positions < cut only: disjoint
        starts = _positions(full, window)
        assert starts and all(start + 64 <= cut for start in starts)
    train = torch.cat([batch["input_ids"] for batch in tiny_data.train_dataloader()])
    assert train.shape == (cut // 64, 64)
    assert torch.equal(train.sort(dim=0).values, full[: cut // 64 * 64].view(-1, 64).sort(0).values)
    assert len(tiny_data.test_dataloader()) == len(tiny_data.val_dataloader()) == 4


def test_test_windows_are_the_held_out_windows_after_the_validation_ones(tiny_data):
    """`ppq test` and `ppq validate` printed the same numbers: test_dataloader returned the
    validation windows."""
    full = torch.tensor(
        load_tokenizer("bytes").encode(pydoc_text(), add_special_tokens=False, verbose=False)
    )
    cut = int(len(full) * 0.9)
    tested = torch.cat([b["input_ids"] for b in tiny_data.test_dataloader()])
    assert torch.equal(tested.flatten(), full[cut + 4 * 64 : cut + 8 * 64])  # after validation's
    validated = torch.cat([b["input_ids"] for b in tiny_data.val_dataloader()])
    assert torch.equal(validated.flatten(), full[cut : cut + 4 * 64])  # unchanged


def test_validate_and_test_report_different_numbers(tmp_path, tiny_lm, tiny_data):
    trainer = make_trainer(tmp_path)
    validated = trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False)[0]["val/ppl"]
    tested = trainer.test(tiny_lm, datamodule=tiny_data, verbose=False)[0]["test/ppl"]
    assert math.isfinite(tested) and tested != pytest.approx(validated, rel=1e-6)


def test_no_test_window_left_is_a_clear_error(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)  # 180 held-out bytes
    for windows in (None, 5, 6):  # 5 windows of 32 held out: validation reads all of them
        data = TextDataModule(
            source="files",
            paths=[str(text)],
            tokenizer="bytes",
            seqlen=32,
            max_eval_windows=windows,
        )
        assert len(data.val_dataloader()) == 5
        with pytest.raises(
            PPQConfigError,
            match=rf"no test window left: .* holds 5 window\(s\) of seqlen=32, and validation "
            rf"reads all of them \(max_eval_windows={windows}\).*set max_eval_windows below 5",
        ):
            data.test_dataloader()
    data = TextDataModule(
        source="files", paths=[str(text)], tokenizer="bytes", seqlen=32, max_eval_windows=3
    )
    assert [len(data.val_dataloader()), len(data.test_dataloader())] == [3, 2]


def _hub_splits(monkeypatch):
    """`datasets` objects of the shape wikitext2 and c4 load, built offline: every split's
    documents say which split and document they are."""
    datasets = pytest.importorskip("datasets")
    from ppq_lightning.datamodules import text

    def documents(split, n):
        return datasets.Dataset.from_dict({"text": [f"<{split} {i}> " * 3 for i in range(n)]})

    def load(source, *args, **kwargs):
        if source == "wikitext2":
            return datasets.DatasetDict(
                {s: documents(s, 50) for s in ("train", "validation", "test")}
            )
        return documents(kwargs["split"], 3000)

    monkeypatch.setattr(text, "_load_dataset", load)


def _text(windows: torch.Tensor) -> str:
    return load_tokenizer("bytes").decode(windows.flatten().tolist())


def test_wikitext2_validates_on_its_validation_split_and_tests_on_its_test_split(monkeypatch):
    _hub_splits(monkeypatch)
    data = TextDataModule(source="wikitext2", tokenizer="bytes", seqlen=32, max_eval_windows=None)
    data.setup()
    validated, tested = _text(data.eval_windows), _text(data.test_windows)
    assert "<validation 0>" in validated and "test" not in validated
    assert "<test 0>" in tested and "validation" not in tested
    assert "<train" in _text(data.calibration_windows())


def test_c4_tests_on_the_validation_documents_after_the_evaluated_ones(monkeypatch):
    _hub_splits(monkeypatch)
    data = TextDataModule(source="c4", tokenizer="bytes", seqlen=64, max_eval_windows=None)
    data.setup()
    validated, tested = _text(data.eval_windows), _text(data.test_windows)
    assert validated.startswith("<validation 0>") and "<validation 1099>" in validated
    assert tested.startswith("<validation 1100>") and "<validation 2199>" in tested
    assert "<validation 1099>" not in tested and "<validation 2200>" not in tested


def test_all_eval_windows_and_lazy_calibration_dataloader():
    data = TextDataModule(
        tokenizer="bytes",
        seqlen=256,
        max_eval_windows=None,
        num_calibration_samples=3,
        batch_size=2,
    )
    batches = list(data.calibration_dataloader())  # no setup() call before
    assert [b["input_ids"].shape for b in batches] == [(2, 256), (1, 256)]
    held_out = len(data.train_tokens) / 0.9 * 0.1
    assert data.eval_windows.shape[0] == pytest.approx(held_out / 256, abs=1)


def test_training_order_is_seeded(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("".join(chr(97 + i % 26) * 3 for i in range(2000)))

    def order(seed):
        data = TextDataModule(source="files", paths=[str(text)], tokenizer="bytes", seed=seed)
        return torch.cat([b["input_ids"][:, :8] for b in data.train_dataloader()])

    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))


def _offline(monkeypatch):
    """Offline hub: the env vars alone are too late once huggingface_hub has been imported."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if importlib.util.find_spec("datasets") is not None:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_corpus_offline_is_a_clear_error(monkeypatch, source):
    _offline(monkeypatch)
    with pytest.raises(PPQConfigError, match=rf"source='{source}'.*pip install datasets.*'pydoc'"):
        TextDataModule(source=source, tokenizer="bytes").setup()


def test_missing_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(PPQConfigError, match=r"source='wikitext2'.*pip install datasets"):
        TextDataModule(source="wikitext2", tokenizer="bytes").setup()
