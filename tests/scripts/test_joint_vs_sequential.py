"""scripts/joint_vs_sequential.py on a tiny Llama: every variant evaluated, the joint search at
the measured C of P>Q."""

import csv
from pathlib import Path

import pytest

from ppq_lightning.errors import PPQConfigError
from tests.scripts.helpers import load_script

ROOT = Path(__file__).parents[2]


def test_every_variant_is_evaluated_and_the_joint_search_meets_the_budget(tmp_path):
    summary = load_script("joint_vs_sequential").main(
        [
            "--config", str(ROOT / "configs" / "experiments" / "tiny.yaml"),
            "--num_calibration_batches", "2", "--score_batches", "1",
            "--output", str(tmp_path),
        ]
    )  # fmt: skip
    with open(tmp_path / "variants.csv") as f:
        rows = {r["variant"].split(" ")[0]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense", "P0.25>Q4", "Q4>P0.25", "RTN3", "joint"}
    assert (
        float(rows["joint"]["measured_C"])
        >= summary["budget"]
        == float(rows["P0.25>Q4"]["measured_C"])
    )
    assert all(float(r["ppl"]) > 1 for r in rows.values())
    assert summary["joint_moves"] > 0 and (tmp_path / "README.md").exists()


def test_on_the_fashion_mnist_resnet_the_channels_are_coupled_groups(fashion_mnist_root, tmp_path):
    summary = load_script("joint_vs_sequential").main(
        [
            "--config", str(ROOT / "configs" / "experiments" / "fashion_mnist.yaml"),
            "--data.init_args.root", str(fashion_mnist_root),
            "--data.init_args.max_eval_samples", "64",
            "--data.init_args.num_calibration_samples", "32",
            "--data.init_args.batch_size", "32",
            "--channels", "depgraph", "--bn_recalibration", "true",
            "--num_calibration_batches", "1", "--score_batches", "1",
            "--joint_bits", "[8, 4, 3]", "--joint_keep", "[1.0, 0.5]", "--rescore_every", "64",
            "--output", str(tmp_path),
        ]
    )  # fmt: skip
    with open(tmp_path / "variants.csv") as f:
        rows = {r["variant"].split(" ")[0]: r for r in csv.DictReader(f)}
    assert float(rows["joint"]["measured_C"]) >= summary["budget"] > 8.0  # 32-bit weights
    assert 0.0 <= float(rows["joint"]["acc"]) <= 1.0


def test_an_unknown_channels_kind_is_refused(tmp_path):
    with pytest.raises(PPQConfigError, match="channels='heads'"):
        load_script("joint_vs_sequential").main(
            [
                "--config", str(ROOT / "configs" / "experiments" / "tiny.yaml"),
                "--channels", "heads", "--output", str(tmp_path),
            ]
        )  # fmt: skip
