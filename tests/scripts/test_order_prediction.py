"""scripts/order_prediction.py: its rules and noise floor on hand numbers, a hand-made grid whose
winners are known, and a grid made by scripts/order_grid.py on a tiny Llama (every predictor
judged on every pair, the tables written)."""

import csv
import json
import math
import shlex
from pathlib import Path

import pytest

from tests.scripts.helpers import load_script

ROOT = Path(__file__).parents[2]
TINY = """
model:
  class_path: ppq_lightning.models.CausalLMModule
  init_args:
    model_config: {model_type: llama, vocab_size: 384, hidden_size: 64, intermediate_size: 128,
                   num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}
data:
  class_path: ppq_lightning.datamodules.TextDataModule
  init_args: {source: pydoc, tokenizer: bytes, seqlen: 64, max_eval_windows: 4,
              num_calibration_samples: 4}
"""


def _script(name):
    return load_script(name)


@pytest.fixture
def prediction(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # order_prediction imports order_grid
    return _script("order_prediction")


@pytest.mark.parametrize(
    ("a", "expected"), [(0.99, False), (-0.99, False), (1.0, False), (1.01, True), (-1.01, True)]
)
def test_a_pair_is_decided_above_one_percent_of_the_better_perplexity(prediction, a, expected):
    row = {"A": a, "order[P>Q]": 100.0 + max(-a, 0), "order[Q>P]": 100.0 + max(a, 0)}
    assert prediction.decided(row, "ppl", noise_ppl=0.01, noise_acc=0.003) is expected


def test_the_perplexity_floor_is_a_share_of_the_better_order(prediction):
    row = {"A": 60.0, "order[P>Q]": 100.0, "order[Q>P]": 160.0}  # 50 % of 100, not of 160
    assert prediction.decided(row, "ppl", noise_ppl=0.5, noise_acc=0.003)
    assert not prediction.decided({**row, "A": 49.0}, "ppl", noise_ppl=0.5, noise_acc=0.003)


@pytest.mark.parametrize(("a", "expected"), [(0.0029, False), (-0.0031, True), (0.0031, True)])
def test_an_accuracy_pair_is_decided_above_the_accuracy_floor(prediction, a, expected):
    row = {"A": a, "order[P>Q]": 0.9, "order[Q>P]": 0.9 - a}  # the floor is absolute
    assert prediction.decided(row, "acc", noise_ppl=0.01, noise_acc=0.003) is expected


def test_the_rules_on_a_hand_row(prediction):
    row = {"pih_order": "Q>P", "C*[P]": 3.0, "C*[Q]": 2.0}
    rules = prediction.rule_predictions(row, ["P", "Q"])
    assert rules == {"pih": "Q>P", "prune_first": "P>Q", "pih_cer": "Q>P"}
    row = {"pih_order": "P>Q", "C*[P]": math.inf, "C*[Q]": 2.0}  # P worse than any RTN point
    assert prediction.rule_predictions(row, ["P", "Q"])["pih_cer"] == "Q>P"
    row = {"pih_order": "P>Q", "C*[P]": None, "C*[Q]": 2.0}  # no curve: no C* rule
    assert prediction.rule_predictions(row, ["P", "Q"]) == {"pih": "P>Q", "prune_first": "P>Q"}


def _study(label, p, q, pq, qp, pih, cer_p, cer_q):
    """A report row of an order_grid study (perplexities: lower is better, M = -ppl)."""
    best = f"{p}>{q}" if pq < qp else f"{q}>{p}" if qp < pq else f"{p}>{q}={q}>{p}"
    return {
        "study": label,
        "best_order": best,
        "A": qp - pq,
        f"order[{p}>{q}]": pq,
        f"order[{q}>{p}]": qp,
        "pih_order": pih,
        f"C*[{p}]": cer_p,
        f"C*[{q}]": cer_q,
    }


def test_a_hand_made_grid_is_scored_against_its_known_winners(tmp_path, prediction):
    """The rules are judged against a report.json written by hand: the winners are known."""
    grid = tmp_path / "hand_grid"
    grid.mkdir()
    tiny = ROOT / "configs" / "experiments" / "tiny.yaml"
    command = ["python", "scripts/order_grid.py", "--config", str(tiny), "--sparsities", "[0.5]",
               "--bits", "[2, 4, 8]", "--num_calibration_batches", "1",
               "--output", str(grid)]  # fmt: skip
    summary = {"command": shlex.join(command), "metric": "ppl"}
    (grid / "summary.json").write_text(json.dumps(summary))
    studies = [  # P50_Q2: Q first wins by 20 %; P50_Q4: P first by 0.5 %; P50_Q8: a tie
        _study("P50_Q2", "P50", "Q2", 120.0, 100.0, "Q2>P50", 2.0, 8.0),
        _study("P50_Q4", "P50", "Q4", 100.0, 100.5, "Q4>P50", math.inf, 4.0),
        _study("P50_Q8", "P50", "Q8", 100.0, 100.0, "Q8>P50", 1.5, 2.0),
    ]
    (grid / "report.json").write_text(json.dumps({"studies": studies}))
    out = tmp_path / "prediction"
    rules = "[pih, pih_cer, prune_first]"
    prediction.main(["--grids", f"[{grid}]", "--predictors", rules, "--output", str(out)])
    rows = {r["pair"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert [rows[p]["best"] for p in rows] == ["Q2>P50", "P50>Q4", "P50>Q8=Q8>P50"]
    assert [rows[p]["decided"] for p in rows] == ["True", "False", "False"]
    for pair, pih, pih_cer, prune_first in [
        ("P50_Q2", "True", "False", "False"),  # C*: P50 2 < Q2 8 says P first: wrong
        ("P50_Q4", "False", "False", "True"),  # C*[P50] = inf says Q first: wrong
        ("P50_Q8", "True", "True", "True"),  # a tie is right for either order
    ]:
        assert (rows[pair]["pih"], rows[pair]["pih_cer"], rows[pair]["prune_first"]) == (
            pih,
            pih_cer,
            prune_first,
        ), pair
    table = {t["grid"]: t for t in csv.DictReader((out / "accuracy.csv").open())}
    assert list(table) == ["hand_grid", "all"]
    expected = {"pairs": "3", "decided": "1", "pih": "2/3", "pih (decided)": "1/1",
                "pih_cer": "1/3", "pih_cer (decided)": "0/1", "prune_first": "2/3",
                "prune_first (decided)": "0/1"}  # fmt: skip
    for grid_name in table:
        assert {k: table[grid_name][k] for k in expected} == expected


def test_predictors_are_judged_against_the_exhaustive_grid(tmp_path, prediction, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    grid = tmp_path / "grid"
    _script("order_grid").main(
        ["--config", str(config), "--sparsities", "[0.5]", "--bits", "[2, 4]",
         "--curve_bits", "[8, 4, 2]", "--num_calibration_batches", "2", "--output", str(grid)]
    )  # fmt: skip
    assert "order_grid.py --config" in json.loads((grid / "summary.json").read_text())["command"]
    tops = []  # the two model predictors' rankings, as the script got them

    def rankings(*args, **kwargs):
        found = real(*args, **kwargs)
        tops.append({name: ">".join(ranking.top) for name, ranking in found.items()})
        return found

    real = prediction.interference_rankings
    monkeypatch.setattr(prediction, "interference_rankings", rankings)
    out = tmp_path / "prediction"
    prediction.main(["--grids", f"[{grid}]", "--output", str(out)])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    report = {r["study"]: r for r in json.loads((grid / "report.json").read_text())["studies"]}
    assert [r["pair"] for r in rows] == ["P50_Q2", "P50_Q4"] == list(report)
    for row, top in zip(rows, tops, strict=True):  # each judged against the grid's own best
        study = report[row["pair"]]
        best = study["best_order"].split("=")
        p, q = study["stages"].split(",")
        assert row["best"] == study["best_order"] and row["A"] == str(study["A"])
        assert row["pih"] == str(study["pih_order"] in best)
        assert row["prune_first"] == str(f"{p}>{q}" in best)
        cer = sorted((p, q), key=lambda n: study[f"C*[{n}]"])
        assert row["pih_cer"] == str(">".join(cer) in best)
        assert row["interference"] == str(top["interference"] in best)
        assert row["calibration_kl"] == str(top["calibration_kl"] in best)
        assert int(row["interference_applications"]) == 4
    table = list(csv.DictReader((out / "accuracy.csv").open()))
    assert [t["grid"] for t in table] == ["grid", "all"]
    assert table[0]["pih"] == f"{sum(r['pih'] == 'True' for r in rows)}/2"
    assert (out / "accuracy.png").is_file() and (out / "README.md").is_file()
