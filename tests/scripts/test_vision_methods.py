"""scripts/vision_methods.py on the shipped Fashion-MNIST ResNet-18: every row measured, the
report written, the floor ratio consistent."""

import json
from pathlib import Path

import pytest

from ppq_lightning.errors import PPQConfigError
from tests.scripts.helpers import load_script

ROOT = Path(__file__).parents[2]


def _script():
    return load_script("vision_methods")


def test_methods_and_both_orders_of_a_pair(fashion_mnist_root, tmp_path):
    out = tmp_path / "report"
    report = _script().main(
        [
            "--config", str(ROOT / "configs" / "experiments" / "fashion_mnist.yaml"),
            "--data.init_args.root", str(fashion_mnist_root),
            "--data.init_args.max_eval_samples", "64",
            "--data.init_args.num_calibration_samples", "32",
            "--data.init_args.batch_size", "32",
            "--num_calibration_batches", "1",
            "--methods", "[rtn4, wanda2_4]",
            "--pairs", "[[magnitude50, rtn4]]",
            "--output", str(out),
        ]
    )  # fmt: skip
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["dense", "rtn4", "wanda2_4", "magnitude50>rtn4", "rtn4>magnitude50"]
    assert report["calibration_images"] == 32 and report["evaluation_images"] == 64
    assert 0 < report["floor_seconds"] < report["hessian_floor_seconds"] and report["blocks"] > 0
    assert rows["dense"]["measured_C"] == 1.0 and 0.8 < rows["dense"]["acc+BN"] <= 1.0
    assert rows["rtn4"]["measured_C"] == pytest.approx(8.0, rel=0.05)  # 32 -> 4 bits
    assert rows["wanda2_4"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    for name in ("magnitude50>rtn4", "rtn4>magnitude50"):
        assert rows[name]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert rows[name]["measured_C"] > rows["rtn4"]["measured_C"]
    for row in list(rows.values())[1:]:
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc+BN"] <= 1.0
        assert row["x_floor"] == pytest.approx(row["seconds"] / report["floor_seconds"])
    assert rows["dense"]["acc"] > 0.8
    saved = json.loads((out / "report.json").read_text())
    assert [row["method"] for row in saved["rows"]] == list(rows)
    text = (out / "README.md").read_text()
    assert "| rtn4>magnitude50 |" in text and "vision_methods.py" in text


def test_method_names_build_their_stage():
    script = _script()
    widths = {"conv3x3": 144, "depthwise": 9}
    stage = script.method("sparsegpt2_4", 2, 32, widths)
    assert (type(stage).__name__, stage.pattern) == ("SparseGPT", "2:4")
    assert stage.ignore == ["^depthwise$"] and stage.num_calibration_batches == 2
    assert script.method("wanda25_layer", 2, 32, widths).scope == "layer"
    assert script.method("magnitude30", 2, 32, widths).sparsity == pytest.approx(0.3)
    assert script.method("gptq6", 2, 32, widths).bits == 6
    assert script.method("channels10", 2, 32, widths).ratio == pytest.approx(0.1)
    for bad in ("rtn", "magnitude50_layer", "quant4"):
        with pytest.raises(PPQConfigError, match=f"methods='{bad}'"):
            script.method(bad, 2, 32, widths)
