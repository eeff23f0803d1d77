"""Writing an export folder atomically, and reading safetensors files safely.

Every format writes into a temporary sibling folder that replaces the target only when all of
it is written: an interrupted export leaves no half folder under the target's name.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ppq_lightning.errors import PPQConfigError, bad_value

MANIFEST = "export.json"


def check_target(path: str | Path, overwrite: bool) -> Path:
    """The export folder ``path``, refused when it exists and ``overwrite`` is False.

    Raises:
        PPQConfigError: naming the path, when it exists (or is a file) without ``overwrite``.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise bad_value("path", str(target), "a folder that does not exist yet (or overwrite=True)")
    if target.exists() and not target.is_dir():
        raise bad_value("path", str(target), "a folder (it is a file)")
    return target


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it becomes ``target``
    (replacing an older one), on failure it is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``export.json`` (what was exported, how, and the sizes) into ``folder``."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in ``folder`` but the manifest."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)


def counted_bytes(tensors: dict[str, Any], layers: list[str], parts: tuple[str, ...]) -> int:
    """Bytes the stored ``tensors`` spend on the weights of ``layers`` (keys ``layer.part``)."""
    keys = {f"{layer}.{part}" if layer else part for layer in layers for part in parts}
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k in keys)


def open_safetensors(path: Path) -> Any:
    """``safetensors.safe_open`` on ``path``, with a clear error on a missing or broken file.

    Raises:
        PPQConfigError: naming the file when it is missing, truncated or not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise bad_value("path", str(path), "an existing safetensors file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise PPQConfigError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
