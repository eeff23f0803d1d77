"""Writing an export folder atomically, checksums, and reading safetensors files safely.

Every format writes into a hidden sibling folder, ``.NAME.ppq-new-PID-HOST-XXXX``, that
replaces the target only when all of it is written:

- a new path: the staging folder is renamed to it (one ``rename``);
- ``overwrite=True`` over an earlier export: the two folders are swapped in one system call
  (Linux ``renameat2(RENAME_EXCHANGE)``), so the path holds the old export, then the new one,
  never nothing; the old one, now under the hidden name, is then deleted. Where the exchange is
  not available (another OS or filesystem), the old export is renamed to
  ``.NAME.ppq-old-PID-HOST-XXXX`` just before the staging folder takes its place.

What a kill leaves, at each moment: before the swap, the old export (or nothing) at the path and
a hidden staging folder; after the swap, the new export and the old one hidden; between the two
renames of the fallback, the old export hidden and no folder at the path. The next export to
that path, and every loader of it (:func:`recover`), restores a hidden old export whose path is
empty and deletes the hidden folders of processes that are no longer running, so nothing stays
hidden for long and an export is never lost.

``overwrite=True`` replaces only a folder that holds an earlier export and nothing else: its
``export.json`` lists its files (with their sha256, :func:`checksums`), and a file it does not
list (a user's notes) makes the overwrite refuse, naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.reports import current_umask

MANIFEST = "export.json"
CHECKSUMS = "sha256"  # export.json: {file path relative to the folder: sha256 hex digest}
_STAGING, _BACKUP = "new", "old"
# what format='peft' wrote before export.json listed files below the top level
_LEGACY_SUBFOLDERS = {"peft": ("base", "adapter")}


class UnverifiedExportWarning(UserWarning):
    """An export folder without checksums (written before they were recorded): loaded as is."""


def _hidden_prefix(target: Path, kind: str | None = None) -> str:
    return f".{target.name}.ppq-" + ("" if kind is None else f"{kind}-")


def _owner_tag() -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f"{os.getpid()}-{host}-"


def _is_ours_and_dead(leftover: Path, target: Path) -> str | None:
    """The kind (``new``/``old``) of a hidden folder a killed export on this host left beside
    ``target``, or None when it is not one (another host's, or its process still runs)."""
    rest = leftover.name.removeprefix(_hidden_prefix(target))
    kind, _, owner = rest.partition("-")
    pid, _, host_rest = owner.partition("-")
    if kind not in (_STAGING, _BACKUP) or not pid.isdigit():
        return None
    host = _owner_tag().split("-", 1)[1]
    if not host_rest.startswith(host):
        return None  # another machine's export into a shared folder: not ours to judge
    if int(pid) == os.getpid():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return kind
    except PermissionError:
        return None  # alive, another user's
    return None


def recover(target: str | Path) -> None:
    """Repair what a killed export left beside ``target``: a hidden earlier export whose path
    is empty goes back to the path; hidden folders of exports whose process is gone are deleted.

    Best effort: a folder that cannot be changed (read-only media) is left as it is.
    """
    target = Path(target)
    parent = target.parent
    if not target.name or not parent.is_dir():
        return
    pattern = glob.escape(_hidden_prefix(target)) + "*"
    leftovers = sorted(parent.glob(pattern), key=lambda p: _BACKUP not in p.name)  # old first
    for leftover in leftovers:
        kind = _is_ours_and_dead(leftover, target)
        if kind is None or not leftover.is_dir() or leftover.is_symlink():
            continue
        if kind == _BACKUP and not os.path.lexists(target) and (leftover / MANIFEST).is_file():
            with contextlib.suppress(OSError):  # never deleted while its path is empty
                leftover.rename(target)  # the earlier export, back where it was
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/export.json`` as a dict, None when absent.

    Raises:
        PPQConfigError: when it exists but is not a JSON object.
    """
    file = folder / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PPQConfigError(f"{file} is not readable JSON (corrupt?): {err}") from err
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise PPQConfigError(f"{file} is not an export.json written by ppq_lightning.export.")
    return manifest


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted POSIX paths relative to it."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() != MANIFEST
    )


def _unrecorded(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Files in ``folder`` that its ``export.json`` does not list: not the export's."""
    recorded = manifest.get(CHECKSUMS)
    if isinstance(recorded, dict):
        return [f for f in _files(folder) if f not in recorded]
    listed = set(manifest.get("files") or {})  # older exports: the top-level files only
    subfolders = _LEGACY_SUBFOLDERS.get(manifest.get("format"), ())
    return [f for f in _files(folder) if f not in listed and f.split("/")[0] not in subfolders]


def _check_replaceable(target: Path) -> None:
    """Refuse to replace ``target`` unless it is empty or holds an earlier export only.

    Raises:
        PPQConfigError: naming the path and what is in it that is not an export's.
    """
    if not any(target.iterdir()):
        return  # an empty folder: nothing to lose
    try:
        manifest = _read_manifest(target)
    except PPQConfigError as err:
        raise bad_value(
            "path", str(target), f"an earlier export to replace (overwrite=True); {err}"
        ) from err
    if manifest is None:
        raise bad_value(
            "path",
            str(target),
            f"a folder that holds an earlier export (its {MANIFEST}) when overwrite=True: this "
            "folder holds other files, which overwrite never deletes; choose another path or "
            "move them",
        )
    foreign = _unrecorded(target, manifest)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise bad_value(
            "path",
            str(target),
            f"an export folder holding only what its {MANIFEST} lists when overwrite=True: "
            f"{', '.join(foreign[:3])}{more} are not part of the export, and overwrite never "
            "deletes them; move them or choose another path",
        )


def check_target(path: str | Path, overwrite: bool) -> Path:
    """The export folder ``path`` resolves to, checked before anything is written.

    A symlink to a folder is written through (the link stays, its folder gets the export).

    Args:
        path: the folder to write.
        overwrite: whether an earlier export at ``path`` may be replaced.

    Returns:
        The absolute folder to write (symlinks resolved).

    Raises:
        PPQConfigError: naming the path, for: not a string or path; empty; ``.``, ``..`` or
            ``/`` (no folder name), or a folder holding the current working directory; a
            dangling symlink; a file; an existing folder without ``overwrite``; with
            ``overwrite``, a folder that holds anything but an earlier export.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise bad_value("path", path, "a folder path (a string or a pathlib.Path)")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise bad_value("path", text, "a folder path (not empty)")
    given = Path(text)
    if given.name in ("", ".", ".."):
        raise bad_value("path", text, "a path that names the export folder (not '.', '..' or '/')")
    if given.is_symlink() and not given.exists():
        raise bad_value(
            "path",
            text,
            f"a folder, or a symlink to one (it is a symlink to {os.readlink(given)!r}, which "
            "does not exist): remove the link or point it at a folder",
        )
    target = given.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise bad_value(
            "path", text, f"a folder that does not hold the current working directory ({cwd})"
        )
    recover(target)
    if target.exists():
        if not target.is_dir():
            raise bad_value("path", text, "a folder (it is a file, which export never replaces)")
        if not overwrite:
            raise bad_value("path", text, "a folder that does not exist yet (or overwrite=True)")
        _check_replaceable(target)
    return target


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one system call (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        Whether they were swapped; False where the system or filesystem cannot.

    Raises:
        OSError: on any other failure (then nothing moved).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (AttributeError, OSError):
        return False  # glibc older than 2.28, or another libc
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise OSError(code, os.strerror(code), str(second))
    return True


def _swap_in(staging: Path, target: Path, overwrite: bool) -> None:
    """Put the complete ``staging`` folder at ``target``; the earlier export there stays
    reachable until then (see the module docstring)."""
    if not os.path.lexists(target):
        staging.rename(target)
        return
    if not target.is_dir() or target.is_symlink():
        raise bad_value("path", str(target), "a folder (a file or link appeared there)")
    if not overwrite:
        raise bad_value("path", str(target), "a folder that does not exist yet (or overwrite)")
    _check_replaceable(target)  # again: files may have been added while the export ran
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the earlier export
        return
    backup = Path(
        tempfile.mkdtemp(prefix=_hidden_prefix(target, _BACKUP) + _owner_tag(), dir=target.parent)
    )
    target.rename(backup)  # replaces the empty folder mkdtemp made
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_error(target: Path, err: OSError) -> OSError:
    """The error of a write that failed: the path, what happened, and that nothing was left."""
    reason = err.strerror or str(err)
    return type(err)(
        err.errno,
        f"writing the export at {target} failed ({reason}; on {err.filename or target}): the "
        "path holds what it held before and no hidden folder was left; free space or choose "
        "another path",
    )


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _library_os_error(err: Exception) -> OSError | None:
    """The :class:`OSError` inside a library's own error type: safetensors' Rust writer raises
    ``SafetensorError: ... I/O error: File too large (os error 27)``, which is no ``OSError``."""
    match = _OS_ERROR.search(str(err))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``target``; on success it becomes ``target`` (see the
    module docstring), on failure it is removed and ``target`` is left as it was.

    Args:
        target: the folder :func:`check_target` returned.
        overwrite: whether an earlier export at ``target`` may be replaced.

    Raises:
        OSError: of the same kind as the write's (disk full, read-only folder; also when a
            library reports it in its own error type, as safetensors does), naming the path;
            the folders it created are removed.
        PPQConfigError: when something other than an earlier export appeared at ``target``
            while the export ran.
    """
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(
                prefix=_hidden_prefix(target, _STAGING) + _owner_tag(), dir=target.parent
            )
        )
    except OSError as err:
        _remove_empty(missing)
        raise _write_error(target, err) from err
    try:
        yield staging
        _usual_modes(staging)
        _swap_in(staging, target, overwrite)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(missing)
        raise _write_error(target, err) from err
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(missing)
        inner = _library_os_error(err)
        if inner is None:
            raise
        raise _write_error(target, inner) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(missing)
        raise


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes ``mkdir``/``open`` give under the umask:
    ``mkdtemp`` makes the folder 0700 and safetensors writes its files 0600, which kept an
    export from the other users a shared model folder is for."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders an export created for its parent (deepest first) if still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file in ``folder`` but the manifest."""
    return {name: file_sha256(folder / name) for name in _files(folder)}


def verify(folder: str | Path, below: str = "") -> bool:
    """Check every file ``folder/export.json`` lists under ``below`` against its sha256.

    Args:
        folder: an export folder.
        below: only the files in this subfolder (``"base"`` of a peft export), or all.

    Returns:
        True when checked; False when the folder has no ``export.json`` or one without
        checksums (written before they were recorded): nothing to check against.

    Raises:
        PPQConfigError: naming the first file that is missing or whose bytes changed.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    recorded = None if manifest is None else manifest.get(CHECKSUMS)
    if not isinstance(recorded, dict):
        return False
    prefix = f"{below.strip('/')}/" if below else ""
    for name, digest in sorted(recorded.items()):
        if not name.startswith(prefix):
            continue
        file = folder / name
        if not file.is_file():
            raise PPQConfigError(
                f"{file} is missing: {folder / MANIFEST} lists it as part of the export."
            )
        recorded_size = (manifest.get("files") or {}).get(name)
        if isinstance(recorded_size, int) and file.stat().st_size != recorded_size:
            raise PPQConfigError(
                f"{file} has {file.stat().st_size} bytes, {folder / MANIFEST} records "
                f"{recorded_size}: the file was truncated or changed after the export; "
                "export again."
            )
        if file_sha256(file) != digest:
            raise PPQConfigError(
                f"{file} does not match the sha256 {folder / MANIFEST} records for it: the file "
                "is corrupt or was changed after the export (a flipped bit would load as a "
                "different model); export again."
            )
    return True


def verified_folder(path: str | Path) -> Path:
    """The export folder that ``path`` (a folder, or a file in one) names, recovered from a
    killed overwrite (:func:`recover`) and checked against its checksums (:func:`verify`);
    a warning when it has none to check against.

    Raises:
        PPQConfigError: see :func:`verify`.
    """
    path = Path(path)
    recover(path if path.is_dir() or not os.path.lexists(path) else path.parent)
    folder = path if path.is_dir() else path.parent
    below = ""
    if not (folder / MANIFEST).is_file() and (folder.parent / MANIFEST).is_file():
        below, folder = folder.name, folder.parent  # base/ of a peft export
    if (folder / MANIFEST).is_file() and not verify(folder, below):
        warnings.warn(
            f"{folder / MANIFEST} records no checksums (an export written before they were): "
            "its files are loaded unverified.",
            UnverifiedExportWarning,
            stacklevel=3,
        )
    return folder


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``export.json`` (what was exported, how, the sizes and checksums) into ``folder``."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in ``folder`` but the manifest."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)


def counted_bytes(
    tensors: dict[str, Any],
    layers: list[str],
    parts: tuple[str, ...],
    dense_layers: Iterable[str] = (),
) -> int:
    """Bytes the stored ``tensors`` spend on the weights of ``layers`` (keys ``layer.part``)
    and of ``dense_layers`` (layers no method takes, counted dense in C: their ``weight*``
    matrices, as ``modules.targets.weights_of`` counts them).

    Args:
        tensors: the file's tensors by state-dict key.
        layers: the counted compressible layers (``compressed.accounting.counted_layers``).
        parts: the keys under a counted layer that store its weight (values, scales, masks).
        dense_layers: ``modules.targets.untaken_layers``' names.
    """
    keys = {f"{layer}.{part}" if layer else part for layer in layers for part in parts}
    total = sum(t.numel() * t.element_size() for k, t in tensors.items() if k in keys)
    dense_layers = set(dense_layers)
    for key, t in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if layer in dense_layers and leaf.startswith("weight") and t.dim() >= 2:
            total += t.numel() * t.element_size()
    return total


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
