"""scripts/prune_vs_quantize.py on a tiny Llama: every family's points, C* of the pruning points
against the RTN curve, the joint best order, the tables and the plot."""

import csv
import json
import shlex
from pathlib import Path

from tests.scripts.helpers import load_script

ROOT = Path(__file__).parents[2]


def _script():
    return load_script("prune_vs_quantize")


def test_points_of_each_family_with_c_star_and_the_joint_order(tmp_path):
    out = tmp_path / "out"
    summary = _script().main(
        [
            "--config", str(ROOT / "configs" / "experiments" / "tiny.yaml"),
            "--pruning", "[magnitude]", "--sparsities", "[0.5]",
            "--quantization", "[rtn]", "--bits", "[8, 2]",
            "--joint_sparsities", "[0.5]", "--joint_bits", "[2]",
            "--num_calibration_batches", "1", "--output", str(out),
        ]
    )  # fmt: skip
    with open(out / "points.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["family"] for r in rows] == ["pruning", "quantization", "quantization", "joint"]
    assert all(float(r["measured_C"]) >= 1 for r in rows)
    assert rows[0]["C*"] != "" and rows[0]["Q better at equal C"] in ("True", "False")
    assert rows[3]["best_order"] in ("P50>Q2", "Q2>P50")
    assert summary["pruning_points"] == 1 and summary["metric"] == "ppl"
    assert (out / "prune_vs_quantize.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["quantization_better_at_equal_C"] in (
        0,
        1,
    )
    assert "Kuzmin" in (out / "README.md").read_text()
    again = _script().main(shlex.split(summary["command"])[2:])  # cached: nothing recomputed
    assert again["quantization_better_at_equal_C"] == summary["quantization_better_at_equal_C"]
