"""scripts/prune_vs_quantize.py: C* and "quantization better at equal C" on a hand-made RTN
curve, then on a tiny Llama (every family's points, the joint best order, the tables and the
plot)."""

import csv
import json
import math
import shlex
from pathlib import Path

import pytest

from ppq_lightning.order.metrics import compression_equivalence_ratio
from tests.scripts.helpers import load_script

ROOT = Path(__file__).parents[2]


def _script():
    return load_script("prune_vs_quantize")


def _row(family, method, c, m):
    return {"family": family, "method": method, "measured_C": c, "M": m}


def test_c_star_and_the_equal_c_verdict_on_a_hand_made_curve():
    """Dense M = -10 at C = 1; RTN at C = 2, 4, 8 gives -11, -13, -20 (a GPTQ point, better than
    RTN, is not on the curve). C* is interpolated in log C: M = -12 lies halfway from C = 2 to
    C = 4, so C* = 2 * sqrt(2) ~ 2.83."""
    rows = [
        _row("quantization", "rtn", 2.0, -11.0),
        _row("quantization", "rtn", 4.0, -13.0),
        _row("quantization", "rtn", 8.0, -20.0),
        _row("quantization", "gptq", 4.0, -10.5),
        _row("pruning", "magnitude", 2.0, -12.0),  # RTN at C = 2 scores -11: RTN beats it
        _row("pruning", "magnitude", 1.2, -10.5),  # halfway from dense to C = 2: C* = sqrt(2)
        _row("pruning", "wanda", 3.0, -12.0),  # RTN at C = 3 scores below -12: pruning wins
        _row("pruning", "sparsegpt", 1.5, -25.0),  # worse than 2-bit RTN: C* = inf
        _row("structured", "depgraph", 1.5, -9.0),  # better than dense: C* = 1
        _row("joint", "magnitude x rtn", 16.0, -16.5),  # halfway from C = 4 to C = 8
    ]
    _script().equivalent_c(rows, dense_m=-10.0)
    verdicts = [(r.get("C*"), r.get("Q better at equal C")) for r in rows]
    assert verdicts[:4] == [(None, None)] * 4  # quantization points get no C*
    assert verdicts[4] == (pytest.approx(2 * math.sqrt(2)), True)
    assert verdicts[5] == (pytest.approx(math.sqrt(2)), True)
    assert verdicts[6] == (pytest.approx(2 * math.sqrt(2)), False)
    assert verdicts[7] == (math.inf, True)
    assert verdicts[8] == (1.0, False)
    assert verdicts[9] == (pytest.approx(4 * math.sqrt(2)), False)


def test_without_an_rtn_point_there_is_no_c_star():
    rows = [_row("quantization", "gptq", 4.0, -11.0), _row("pruning", "magnitude", 2.0, -12.0)]
    _script().equivalent_c(rows, dense_m=-10.0)
    assert "C*" not in rows[1] and "Q better at equal C" not in rows[1]


def _cells(folder: Path) -> dict[str, float]:
    """order -> value of every cell the studies wrote."""
    cells = [json.loads(path.read_text()) for path in (folder / "cells").glob("*.json")]
    return {cell["order"]: cell["value"] for cell in cells}


def test_points_of_each_family_with_c_star_and_the_joint_order(tmp_path):
    out = tmp_path / "out"
    summary = _script().main(
        [
            "--config", str(ROOT / "configs" / "experiments" / "tiny.yaml"),
            "--pruning", "[magnitude]", "--sparsities", "[0.3, 0.5]",
            "--quantization", "[rtn]", "--bits", "[8, 2]",
            "--joint_sparsities", "[0.5]", "--joint_bits", "[2]",
            "--num_calibration_batches", "1", "--output", str(out),
        ]
    )  # fmt: skip
    with open(out / "points.csv") as f:
        rows = list(csv.DictReader(f))
    families = ["pruning", "pruning", "quantization", "quantization", "joint"]
    assert [r["family"] for r in rows] == families
    assert all(float(r["measured_C"]) >= 1 for r in rows)
    cells = _cells(out)
    # each point is its cell; the joint point is the better (lower perplexity) of its two orders
    points = [cells[order] for order in ("P30", "P50", "Q8", "Q2")]
    assert [float(r["value"]) for r in rows[:4]] == points
    joint = {order: cells[order] for order in ("P50>Q2", "Q2>P50")}
    assert joint["P50>Q2"] != joint["Q2>P50"]
    assert rows[4]["best_order"] == min(joint, key=joint.get)
    assert float(rows[4]["value"]) == min(joint.values())
    # C* of the pruning points: on the curve (dense, RTN 8, RTN 2) read back from the files
    rtn = [(float(r["measured_C"]), float(r["M"])) for r in rows[2:4]]
    curve = [(1.0, -summary["dense"]), *rtn]
    for pruning in rows[:2]:
        c_star = compression_equivalence_ratio(curve, float(pruning["M"]))
        assert float(pruning["C*"]) == pytest.approx(c_star)
        assert pruning["Q better at equal C"] == str(c_star > float(pruning["measured_C"]))
    verdicts = [r["Q better at equal C"] for r in rows[:2]]
    assert sorted(verdicts) == ["False", "True"]  # this seed: P30 beats RTN, P50 does not
    assert summary["pruning_points"] == 2 and summary["metric"] == "ppl"
    q_wins = verdicts.count("True")
    assert summary["quantization_better_at_equal_C"] == q_wins
    written = json.loads((out / "summary.json").read_text())
    assert written["quantization_better_at_equal_C"] == q_wins
    assert (out / "prune_vs_quantize.png").stat().st_size > 1000
    readme = (out / "README.md").read_text()
    assert "Kuzmin" in readme and f"in {q_wins} of 2 pruning points" in readme
    again = _script().main(shlex.split(summary["command"])[2:])  # cached: nothing recomputed
    assert again["quantization_better_at_equal_C"] == summary["quantization_better_at_equal_C"]
