"""The README's worked example of a user's own LightningModule runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.user_modules import modules

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(heading: str) -> str:
    """The first ```python block under the README heading ``heading``."""
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_own_module_example_runs_and_reports_the_modules_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer's default folders
    namespace = {"val_loader": modules.images(n=16)}
    exec(compile(section_code("Your own LightningModule"), "README.md", "exec"), namespace)
    model, rows, metrics = namespace["model"], namespace["rows"], namespace["metrics"]
    assert [row["stage"] for row in rows] == ["0_dense", "1_wanda", "2_gptq"]
    recomputed = modules.accuracy_of(model, namespace["val_loader"])
    assert rows[-1]["val_acc"] == pytest.approx(recomputed)
    assert metrics[0]["val_acc"] == pytest.approx(recomputed)
