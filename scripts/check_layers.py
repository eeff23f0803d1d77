"""Check the import-layer contracts of ``[tool.importlinter]`` in pyproject.toml (import-linter).

``callbacks/`` and ``datamodules/`` install into the ``ppq_lightning`` namespace through
``[tool.setuptools] package-dir``, which import-linter cannot see in the source tree, so the
package is assembled as it installs (the mapping read from pyproject.toml) in a temporary
folder, and the contracts are checked there. ``make lint`` (so ``make test``) runs it.

    python scripts/check_layers.py [--verbose]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def assemble(target: Path) -> list[str]:
    """Copy every package of the ``package-dir`` mapping to its place under ``target``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):  # a package before its subpackages
        shutil.copytree(
            ROOT / folder,
            target.joinpath(*package.split(".")),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    return sorted(mapping)


def main() -> int:
    from importlinter.cli import lint_imports

    with tempfile.TemporaryDirectory() as folder:
        assemble(Path(folder))
        # import-linter puts the working directory first on sys.path: there, the assembled
        # package is found before the source tree and the editable install's mapping
        os.chdir(folder)
        return lint_imports(
            config_filename=str(ROOT / "pyproject.toml"),
            no_cache=True,
            verbose="--verbose" in sys.argv[1:],
        )


if __name__ == "__main__":
    sys.exit(main())
