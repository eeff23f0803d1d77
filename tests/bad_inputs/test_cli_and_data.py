"""The catalogue, part datamodules and the ``ppq`` command line: each case is refused with a
message naming the argument and the value, before the report folder (``--report_dir``,
``--output_dir``) is written, and a datamodule before any data is read."""

from pathlib import Path

import pytest

from ppq_lightning.cli import main
from ppq_lightning.datamodules import (
    ImageFolderDataModule,
    PhotoDataModule,
    TextDataModule,
    VisionDataModule,
)
from ppq_lightning.errors import PPQConfigError
from tests.bad_inputs.helpers import assert_refused, names

CONFIGS = Path(__file__).parents[2] / "configs" / "tiny"
VALIDATE = str(CONFIGS / "llama_p_then_q.yaml")
FIT = str(CONFIGS / "lora_orders.yaml")
STUDY = str(CONFIGS / "study.yaml")

TEXT = [
    ({"seed": "x"}, "seed='x'"),
    ({"seed": True}, "seed=True"),
    ({"max_eval_windows": True}, "max_eval_windows=True"),
    ({"seqlen": True}, "seqlen=True"),
    ({"num_calibration_samples": 2.0}, "num_calibration_samples=2.0"),
    ({"tokenizer": 3}, names("tokenizer=3", "'bytes'")),
    ({"eval_fraction": 1.0}, names("eval_fraction=1.0", "(0, 1)")),
    ({"source": "imagenet"}, names("source='imagenet'", "pydoc")),
    ({"source": "files", "paths": ["/nope/a.txt"]}, names("paths=['/nope/a.txt']", "existing")),
    ({"paths": ["a.txt"]}, names("paths=['a.txt']", "source='pydoc'")),
    ({"calibration_paths": ["a.txt"]}, names("calibration_paths=['a.txt']", "None")),
]


@pytest.mark.parametrize(("kwargs", "match"), TEXT, ids=lambda v: str(v)[:40])
def test_bad_text_datamodule_arguments(kwargs, match):
    assert_refused(
        lambda: TextDataModule(**{"tokenizer": "bytes", **kwargs}), PPQConfigError, match
    )


def test_a_text_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("na\u00efve r\u00e9sum\u00e9 ".encode("latin-1") * 100)
    data = TextDataModule(source="files", paths=[str(bad)], tokenizer="bytes", seqlen=16)
    assert_refused(
        data.setup, PPQConfigError, names("paths", str(bad), "not UTF-8", "0xef"), folder=tmp_path
    )


def _image_root(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
    return str(tmp_path / "images")


IMAGES = [
    (ImageFolderDataModule, {"seed": True}, "seed=True"),
    (ImageFolderDataModule, {"batch_size": "8"}, "batch_size='8'"),
    (ImageFolderDataModule, {"root": "/nope/images"}, names("root='/nope/images'", "folder")),
    (ImageFolderDataModule, {"transform_from": "resnet"}, names("transform_from='resnet'", "timm")),
    (VisionDataModule, {"dataset": "mnist"}, names("dataset='mnist'", "fashion_mnist")),
    (VisionDataModule, {"download": "yes"}, names("download='yes'", "true or false")),
    (VisionDataModule, {"max_eval_samples": True}, "max_eval_samples=True"),
    (PhotoDataModule, {"sources": "opencv"}, names("sources='opencv'", "non-empty list")),
    (PhotoDataModule, {"calibration_fraction": 1.5}, "calibration_fraction=1.5"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), IMAGES, ids=lambda v: str(v)[:40])
def test_bad_image_datamodule_arguments(tmp_path, cls, kwargs, match):
    base = {"root": _image_root(tmp_path)} if cls is not PhotoDataModule else {}
    assert_refused(lambda: cls(**{**base, **kwargs}), PPQConfigError, match, folder=tmp_path)


def _lightning(command, config, *argv):
    def run(tmp_path):
        logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
        report = ["--report_dir", str(tmp_path / "out")]
        return main([command, "--config", config, *logs, *report, *argv])

    run.label = " ".join([command, *argv])
    return run


def _study(*argv):
    def run(tmp_path):
        return main(["study", "--config", STUDY, "--output_dir", str(tmp_path / "out"), *argv])

    run.label = " ".join(["study", *argv])
    return run


COMMANDS = [
    (  # the compression callbacks fire at on_validation_start, which never runs
        _lightning("validate", VALIDATE, "--trainer.limit_val_batches", "0"),
        names("limit_val_batches=0", "'P' (MagnitudePruning", "'Q'", "never applied"),
    ),
    (
        _lightning("test", VALIDATE, "--trainer.limit_test_batches", "0"),
        names("limit_test_batches=0", "'P'", "`test`"),
    ),
    (  # no training: the LoRA stage and the stages after it never ran
        _lightning("fit", FIT, "--trainer.max_steps", "0"),
        names("max_steps=0", "'L' (LoRAFineTune"),
    ),
    (
        _lightning("validate", VALIDATE, "--trainer.callbacks+=nopkg_ppq.Evil"),
        names("--trainer.callbacks='nopkg_ppq.Evil'", "no package 'nopkg_ppq'"),
    ),
    (
        _lightning("fit", FIT, "--model", "os; rm -rf /"),
        names("--model='os; rm -rf /'", "dotted path of Python identifiers"),
    ),
    (
        _lightning("validate", VALIDATE, "--trainer.logger.class_path", "nopkg_ppq.Logger"),
        names("--trainer.logger.class_path='nopkg_ppq.Logger'", "installed"),
    ),
    (
        _lightning(
            "validate",
            VALIDATE,
            "--data.init_args.source",
            "files",
            "--data.init_args.paths",
            "[/nope/corpus.txt]",
        ),
        names("paths=['/nope/corpus.txt']", "existing text files"),
    ),
    (_lightning("validate", VALIDATE, "--order", "P>X"), names("order='P>X'", "'X'")),
    (_study("--curve_bits", "[16, 4]"), names("curve_bits=[16, 4]", "16 is not", "b_orig=16")),
    (_study("--curve_bits", "[4, 4]"), names("curve_bits=[4, 4]", "4 repeats")),
    (_study("--search", "all"), names("search='all'", "exhaustive")),
    (_study("--predictor", "oracle"), names("predictor='oracle'", "calibration_kl")),
    (_study("--top_k", "0"), "top_k=0"),
    (_study("--order", "P>X"), names("order='P>X'", "'X'")),
    (_study("--P.class_path", "nopkg_ppq.Pruner"), names("--P.class_path='nopkg_ppq.Pruner'")),
    (_study("--P.class_path", "Nothing"), names("--P.class_path='Nothing'", "not a compression")),
    (_study("--X.bits", "3"), names("--X.bits", "'X'", "named stages: P, Q")),
    (_study("--Q.sparsity", "0.5"), names("--Q.sparsity", "no argument 'sparsity'")),
    (
        _study("--data.init_args.source", "files", "--data.init_args.paths", "[/nope/b.txt]"),
        names("paths=['/nope/b.txt']", "existing text files"),
    ),
    (_study("--stages", "[]"), names("--stages", "named compression callbacks")),
]


@pytest.mark.parametrize(
    ("command", "match"), COMMANDS, ids=lambda v: v.label if callable(v) else "refused"
)
def test_bad_command_lines(tmp_path, command, match):
    assert_refused(lambda: command(tmp_path), PPQConfigError, match, folder=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_study_output_dir_that_is_a_file(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert_refused(
        lambda: main(["study", "--config", STUDY, "--output_dir", str(taken)]),
        PPQConfigError,
        names("output_dir=", "taken", "is a file"),
        folder=tmp_path,
    )
