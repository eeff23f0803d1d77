"""The paper-experiment scripts run end to end on a tiny model and write their reports."""

import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from ppq_lightning.cli.experiments import provenance, source_commit, write_results_readme

ROOT = Path(__file__).parents[2]
TINY = ["--config", str(ROOT / "configs" / "experiments" / "tiny.yaml")]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_order_grid(tmp_path):
    summary = _script("order_grid").main(
        [
            *TINY,
            "--sparsities",
            "[0.5]",
            "--bits",
            "[2, 8]",
            "--curve_bits",
            "[4]",
            "--output",
            str(tmp_path),
        ]
    )
    assert summary["pairs"] == 2
    # the summary agrees with the studies it read: best = the lower perplexity, PIH counted right
    studies = json.loads((tmp_path / "report.json").read_text())["studies"]
    assert [s["study"] for s in studies] == ["P50_Q2", "P50_Q8"]
    for study in studies:
        p, q = study["stages"].split(",")
        ppl = {order: study[f"order[{order}]"] for order in (f"{p}>{q}", f"{q}>{p}")}
        best = [order for order, value in ppl.items() if value == min(ppl.values())]
        assert study["best_order"] == "=".join(best)
        assert study["pih_correct"] == (study["pih_order"] in best)
    assert summary["pih_correct"] == sum(s["pih_correct"] for s in studies)
    p_first = [s for s in studies if s["best_order"] == s["stages"].replace(",", ">")]
    assert summary["p_first_wins"] == len(p_first)
    # dense + P + Q2 + Q8 + 1 curve point, then 2 orders per pair
    assert summary["evaluations_exhaustive"] == 5 + 4 == summary["evaluations_this_run"]
    assert summary["evaluations_pih"] == 5 + 2
    assert summary["stage_applications_with_reuse"] < summary["stage_applications_without_reuse"]
    assert "| P50_Q2 |" in (tmp_path / "README.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == 2


def _result(p, q, best, pih_correct, evaluations):
    """What ``summarize`` reads of a study's result."""
    return SimpleNamespace(
        stages=(p, q),
        singles={p: SimpleNamespace(keys=(p,)), q: SimpleNamespace(keys=(q,))},
        best_order=best,
        pih_correct=pih_correct,
        budget=SimpleNamespace(
            evaluations=evaluations, applications=3, applications_without_reuse=4
        ),
    )


def test_order_grid_summary_of_a_hand_made_grid():
    """Three pairs with known winners: P first wins one, Q first one, one is a tie; the PIH is
    right on two (a tie counts as right); four distinct single stages, three curve points."""
    results = [
        _result("P50", "Q2", "P50>Q2", True, 5),
        _result("P50", "Q8", "Q8>P50", False, 2),
        _result("P30", "Q8", "P30>Q8=Q8>P30", True, 3),
    ]
    summary = _script("order_grid").summarize(results, n_curve=3)
    assert summary == {
        "pairs": 3,
        "pih_correct": 2,
        "pih_hit_rate": pytest.approx(2 / 3),
        "p_first_wins": 1,
        "ties": 1,
        "evaluations_exhaustive": 1 + 4 + 3 + 2 * 3,
        "evaluations_pih": 1 + 4 + 3 + 3,
        "evaluations_this_run": 10,
        "stage_applications_with_reuse": 9,
        "stage_applications_without_reuse": 12,
    }


def test_order_grid_with_block_removal(tmp_path):
    summary = _script("order_grid").main(
        [
            *TINY,
            "--pruning",
            "block_removal",
            "--sparsities",
            "[0.5]",
            "--bits",
            "[4]",
            "--curve_bits",
            "[4]",
            "--output",
            str(tmp_path),
        ]
    )
    assert summary["pairs"] == 1


def test_split_pruning(tmp_path):
    rows = _script("split_pruning").main(
        [*TINY, "--sparsities", "[0.5]", "--bits", "[4]", "--output", str(tmp_path)]
    )
    (row,) = rows
    # equal total compression in all three schedules
    assert row["C P>Q"] == pytest.approx(row["C P1>Q>P2"]) == pytest.approx(8.0)
    values = {order: row[order] for order in ("P>Q", "Q>P", "P1>Q>P2")}
    assert len(set(values.values())) == 3
    assert row["best"] == min(values, key=values.get)  # perplexity: the lowest is best


def test_mixed_precision_order(tmp_path):
    rows = _script("mixed_precision_order").main([*TINY, "--output", str(tmp_path)])
    by_order = {r["order"]: r for r in rows}
    assert len(by_order) == 6
    # progressive ends at 8/4/2 bits; regressive is re-quantized to 8 bits everywhere
    assert by_order["Q2>Q4>Q8"]["avg_bits"] == 8
    assert by_order["Q8>Q4>Q2"]["avg_bits"] < 5


def test_write_results_readme(tmp_path):
    folder = tmp_path / "report"  # created by the writer
    path = write_results_readme(
        folder,
        "Title",
        "python scripts/x.py --a b",
        "A paragraph.\nIts second line.",
        "",
        "| a |\n|---|",
    )
    assert path == folder / "README.md"
    assert path.read_text() == (
        "# Title\n"
        "\n"
        f"Produced at commit `{source_commit()}` by:\n"
        "\n"
        "    python scripts/x.py --a b\n"
        "\n"
        "A paragraph.\n"
        "Its second line.\n"
        "\n"
        "| a |\n"
        "|---|\n"
    )
    assert [p.name for p in folder.iterdir()] == ["README.md"]  # no temporary file left


def test_results_record_the_commit_they_were_made_at():
    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert source_commit() in (head, f"{head}-dirty")
    assert provenance("python scripts/x.py") == {
        "command": "python scripts/x.py",
        "commit": source_commit(),
    }
