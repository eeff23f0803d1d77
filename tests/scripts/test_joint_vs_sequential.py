"""scripts/joint_vs_sequential.py on a tiny Llama: every variant evaluated, the joint search at
the measured C of P>Q."""

import csv
from pathlib import Path

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
