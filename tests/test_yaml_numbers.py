"""YAML as ppq reads it (``ppq_lightning/yaml_numbers.py``): an unquoted ``2:4`` is the text
``"2:4"`` (PyYAML's YAML 1.1 read it as the base-60 integer 124) and ``1e-3`` is a float, in
LightningCLI configs, on the command line, in sweep files and in study overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ppq_lightning.callbacks import CompressionSchedule
from ppq_lightning.cli.lightning import PPQCLI
from ppq_lightning.study.sweep import load_sweep
from ppq_lightning.yaml_numbers import load_yaml

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2:4", "2:4"),
        ("8:16", "8:16"),
        ("1:30.5", "1:30.5"),
        ("124", 124),
        ("-3", -3),
        ("0x10", 16),
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("-2E+2", -200.0),
        ("1.0e-3", 0.001),
        ("true", True),
        ("unstructured", "unstructured"),
    ],
)
def test_scalars(text, value):
    read = load_yaml(f"x: {text}")["x"]
    assert read == value and type(read) is type(value)


def test_pyyaml_itself_is_untouched():
    assert yaml.safe_load("x: 2:4") == {"x": 124}


def _schedule_pattern(cli: PPQCLI) -> str:
    (schedule,) = [c for c in cli.trainer.callbacks if isinstance(c, CompressionSchedule)]
    return schedule.stages[0].config.pattern


def test_an_unquoted_pattern_in_a_lightningcli_config_is_the_pattern(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "configs/tiny/llama_p_then_q.yaml").read_text()
    assert '{pattern: "2:4", name: P}' in text
    config = tmp_path / "config.yaml"
    config.write_text(text.replace('{pattern: "2:4", name: P}', "{pattern: 2:4, name: P}"))
    cli = PPQCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(config), "--trainer.logger", "false"],
    )
    assert _schedule_pattern(cli) == "2:4"


def test_an_unquoted_sweep_value_is_the_pattern(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "method: grid\n"
        "parameters:\n  pattern: {values: [2:4, unstructured]}\n  lr: {value: 1e-3}\n"
        "command: [ppq, fit, --config, x.yaml, '${args}']\n"
    )
    parameters = load_sweep(sweep)["parameters"]
    assert parameters["pattern"]["values"] == ["2:4", "unstructured"]
    assert parameters["lr"]["value"] == 0.001
