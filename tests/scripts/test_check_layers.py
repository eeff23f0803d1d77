import subprocess
import sys
from pathlib import Path

from tests.scripts.helpers import load_script

SCRIPT = Path(__file__).parents[2] / "scripts" / "check_layers.py"


def _load():
    return load_script("check_layers")


def test_the_package_is_assembled_as_it_installs(tmp_path):
    packages = _load().assemble(tmp_path)
    assert packages == ["ppq_lightning", "ppq_lightning.callbacks", "ppq_lightning.datamodules"]
    root = tmp_path / "ppq_lightning"
    assert (root / "callbacks" / "base.py").is_file()  # callbacks/ mapped into the namespace
    assert (root / "datamodules" / "text.py").is_file()
    assert (root / "compressed" / "state.py").is_file() and (root / "ops" / "gptq.py").is_file()
    assert not list(tmp_path.rglob("__pycache__"))


# run in a fresh interpreter: this one has imported ppq_lightning from the source tree
_CHECK = """
import os, sys
sys.path.insert(0, {scripts!r})
import check_layers
from importlinter.cli import lint_imports
from pathlib import Path
folder = Path({folder!r})
check_layers.assemble(folder)
if {violate!r}:
    cells = folder / "ppq_lightning" / "study" / "cells.py"
    cells.write_text(cells.read_text() + "\\nimport ppq_lightning.callbacks  # noqa\\n")
os.chdir(folder)
sys.exit(lint_imports(config_filename=str(check_layers.ROOT / "pyproject.toml"), no_cache=True))
"""


def _check(folder: Path, violate: bool) -> subprocess.CompletedProcess:
    code = _CHECK.format(scripts=str(SCRIPT.parent), folder=str(folder), violate=violate)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_contracts_hold_and_a_violation_breaks_them(tmp_path):
    kept = _check(tmp_path / "kept", violate=False)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "Contracts: 4 kept, 0 broken." in kept.stdout
    broken = _check(tmp_path / "broken", violate=True)  # a lower layer imports a higher one
    assert broken.returncode == 1
    assert "ppq_lightning.study is not allowed to import ppq_lightning.callbacks" in broken.stdout
