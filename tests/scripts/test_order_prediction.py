"""scripts/order_prediction.py on a grid made by scripts/order_grid.py on a tiny Llama: every
predictor judged on every pair, the tables written."""

import csv
import json
from pathlib import Path

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


def test_predictors_are_judged_against_the_exhaustive_grid(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # order_prediction imports order_grid
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    grid = tmp_path / "grid"
    _script("order_grid").main(
        ["--config", str(config), "--sparsities", "[0.5]", "--bits", "[2, 4]",
         "--curve_bits", "[8, 4, 2]", "--num_calibration_batches", "2", "--output", str(grid)]
    )  # fmt: skip
    assert "order_grid.py --config" in json.loads((grid / "summary.json").read_text())["command"]
    out = tmp_path / "prediction"
    _script("order_prediction").main(["--grids", f"[{grid}]", "--output", str(out)])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["pair"] for r in rows] == ["P50_Q2", "P50_Q4"]
    for row in rows:
        for name in ("pih", "pih_cer", "prune_first", "interference", "calibration_kl"):
            assert row[name] in ("True", "False"), (name, row)
        assert int(row["interference_applications"]) == 4
    table = list(csv.DictReader((out / "accuracy.csv").open()))
    assert [t["grid"] for t in table] == ["grid", "all"]
    assert (out / "accuracy.png").is_file() and (out / "README.md").is_file()
