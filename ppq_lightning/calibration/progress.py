"""Block-granular progress of a calibrated stage on disk, so a killed run continues where it was.

A layer-wise stage (GPTQ, SparseGPT, Wanda, ...) walks a model's blocks one by one; on a large
model each block costs minutes and a whole run hours. :class:`BlockProgress` keeps, for every
finished block, one file with the block's tensors as the stage left them, in a folder of its
own::

    <root>/ppq_progress/<stage name>-<fingerprint[:16]>/
        progress.json             what the fingerprint is made of (to say why another is not used)
        block-00000.safetensors   block 0's state dict after the stage, and what it was before
        block-00001.safetensors   ...

**Fingerprint.** The folder is named by a hash of the stage's full identity (its state key:
the method and every argument that can change the weights it produces), of the calibration
batches (every tensor's dtype, shape and bytes), of the model's structure (every tensor's name,
shape and dtype) and of the tensors outside the model's blocks, as they are when the stage
starts. A run with another model, other data or another stage configuration gets another
folder, and a folder of the same stage name written for another fingerprint is never read (a
warning names it, says which part differs, and that it may be deleted). Each block file also
records a hash of that block's tensors (and compression records) just before the stage
compressed it; a block whose tensors differ now (an earlier stage of a schedule produced other
weights) is not resumed: its file and every later one are deleted with a warning, and the stage
computes them again.

**Files.** A block file is a safetensors file (every tensor of the block's state dict, on the
CPU) whose metadata holds the fingerprint, the block's index and name, its hash before the
stage, the JSON of the non-tensor state (compression records: grids' settings, histories) and
of the per-layer metrics the stage reported, and a checksum of all of it. It is written to a
temporary name in the folder, flushed to disk (``fsync``) and renamed over its final name, so a
kill leaves the old file or the new one, never half of one. A file that cannot be read (a
truncated write, a disk error, a flipped bit that the checksum catches) is refused with a
:class:`~ppq_lightning.errors.CorruptStateError` naming it and what to do, before it changes
any weight.

**What is not saved.** The layers outside the blocks (a stem, a head the user targets) are
compressed again on a rerun; they are seconds where blocks are hours.

**Searches.** A greedy search whose loop is not the engine's (SLEB's block removal, the joint
search) keeps its state after each step in ``steps.json`` (:meth:`BlockProgress.save_steps`,
atomic, fsynced, checksummed), in a folder fingerprinted by the stage, the data and the whole
model (``begin`` with no block names).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from ppq_lightning.compressed.state import STATE_NAME, ensure_state
from ppq_lightning.errors import CorruptStateError, PPQConfigError
from ppq_lightning.modules.tree import find_module
from ppq_lightning.reports import atomic_write, write_json

FORMAT = "ppq-block-progress/1"
FOLDER = "ppq_progress"

BlockLoader = Callable[[nn.Module, dict[str, Any]], None]
"""Puts a saved state dict (tensors and ``._extra_state`` values) into a block."""


class ProgressMismatchWarning(UserWarning):
    """Saved block progress exists but is not used: it was written for another model,
    calibration data or stage configuration, or for a block whose weights differ now."""


class ProgressOffWarning(UserWarning):
    """A stage that would save its progress per block cannot, and runs without it."""


class UnhashableBatchError(TypeError):
    """A calibration batch holds a value whose content cannot be hashed reliably."""


# -- hashing ---------------------------------------------------------------------------------
def _tensor_bytes(tensor: Tensor) -> Any:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy()


def update_with_tensor(digest: Any, tensor: Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and bytes to a ``hashlib`` ``digest``."""
    digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(_tensor_bytes(tensor))


def _update_with_value(digest: Any, value: Any) -> None:
    """Feed a calibration batch's value to ``digest``: tensors by content, containers by their
    items, plain scalars and strings by type and value.

    Raises:
        UnhashableBatchError: on any other object (its content cannot be read reliably).
    """
    if isinstance(value, Tensor):
        update_with_tensor(digest, value)
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, Mapping):
        digest.update(f"{{{len(value)}".encode())
        for key, item in value.items():
            _update_with_value(digest, key)
            _update_with_value(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{type(value).__name__}{len(value)}".encode())
        for item in value:
            _update_with_value(digest, item)
    else:
        raise UnhashableBatchError(type(value).__name__)


def batches_digest(batches: Iterable[Any]) -> str:
    """A hash of calibration ``batches`` (tensors by dtype, shape and bytes; dicts, lists and
    tuples by their items; numbers and strings by value).

    Raises:
        UnhashableBatchError: naming the type of a value that is none of these.
    """
    digest = hashlib.blake2b(digest_size=20)
    for batch in batches:
        _update_with_value(digest, batch)
    return digest.hexdigest()


def _extra_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def state_digest(state: Mapping[str, Any]) -> str:
    """A hash of a state dict: every tensor's name, dtype, shape and bytes, and every other
    value's JSON (compression records)."""
    digest = hashlib.blake2b(digest_size=20)
    for key in sorted(state):
        digest.update(f"{key}\0".encode())
        value = state[key]
        if isinstance(value, Tensor):
            update_with_tensor(digest, value)
        else:
            digest.update(_extra_json(value).encode())
    return digest.hexdigest()


def structure_digest(model: nn.Module) -> str:
    """A hash of ``model``'s structure: every state-dict entry's name, and a tensor's shape and
    dtype (not its values)."""
    digest = hashlib.blake2b(digest_size=20)
    for key, value in model.state_dict(keep_vars=True).items():
        shape = (str(value.dtype), tuple(value.shape)) if isinstance(value, Tensor) else "extra"
        digest.update(f"{key}:{shape};".encode())
    return digest.hexdigest()


def outside_digest(model: nn.Module, block_names: Iterable[str]) -> str:
    """A hash of the state-dict entries of ``model`` outside the blocks named ``block_names``
    (embeddings, final norm, head, ...)."""
    prefixes = tuple(f"{name}." for name in block_names)
    state = model.state_dict(keep_vars=True)
    return state_digest({k: v for k, v in state.items() if not k.startswith(prefixes)})


# -- the block files -------------------------------------------------------------------------
def _folder_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage).strip("._") or "stage"


def block_state(block: nn.Module) -> dict[str, Any]:
    """The state dict of ``block`` as it is saved: tensors detached on the CPU (their own
    copies), other values (extra states) as they are."""
    state = {}
    for key, value in block.state_dict(keep_vars=True).items():
        state[key] = value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value
    return state


def load_block_state(block: nn.Module, state: dict[str, Any]) -> None:
    """The default :data:`BlockLoader`: give every module the saved state has a compression
    state for one (``compressed.state.ensure_state``), then ``block.load_state_dict`` (strict),
    which copies into the existing tensors (an optimizer holding them stays valid).

    Raises:
        RuntimeError: from ``load_state_dict`` when the block's structure does not match (a
            stage that changes shapes passes its own loader).
    """
    marker = f".{STATE_NAME}."
    for key in state:
        if key.startswith(f"{STATE_NAME}."):
            ensure_state(block)
        elif marker in key:
            owner = find_module(block, key.split(marker)[0])
            if owner is not None:
                ensure_state(owner)
    block.load_state_dict(state, strict=True)


class BlockProgress:
    """The progress of one calibrated stage on disk, block by block (see the module docstring).

    The engine (``calibration.engine.calibrate_sequentially``) calls :meth:`begin` once, then
    for every block with target layers :meth:`resumable` (which also records the block's hash
    before compression), :meth:`load` for a resumable one, else :meth:`save` once the block is
    compressed. The stage calls :meth:`finish` when it has succeeded: the folder is deleted.

    Args:
        root: the folder under which ``ppq_progress/`` is kept (a Trainer's
            ``default_root_dir``: stable across reruns of one command).
        stage: the stage's name (the folder's name starts with it).
        identity: the stage's full identity (its ``state_key``).
        metrics: the stage's per-layer metrics, ``{layer: {metric: value}}``, filled as it
            compresses; each block file keeps the entries added while its block was compressed,
            and a resumed block puts them back.
        loader: how a saved state goes back into a block (:func:`load_block_state`; a stage
            that changes shapes passes one that replays its structural edits first).

    Raises:
        PPQConfigError: when ``root`` is not a folder path.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        stage: str,
        identity: str,
        metrics: dict[str, Any] | None = None,
        loader: BlockLoader | None = None,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
            raise PPQConfigError(
                f"the progress folder root={root!r} is not allowed: expected a folder path."
            )
        self.root = Path(root) / FOLDER
        self.stage, self.identity = stage, identity
        self.metrics = metrics if metrics is not None else {}
        self.loader = loader or load_block_state
        self.folder: Path | None = None
        self.fingerprint: str | None = None
        self.files: dict[int, Path] = {}
        self.resumed: list[int] = []
        self.saved: list[int] = []
        self._before: dict[int, str] = {}
        self._seen_metrics: set[str] = set()
        self._off: str | None = None

    # -- start ---------------------------------------------------------------------------------
    def begin(self, model: nn.Module, block_names: list[str], batches: list[Any]) -> None:
        """Fingerprint the run and find the files of a previous run of it.

        Args:
            model: the model as the stage starts (nothing compressed by it yet).
            block_names: the names of the model's blocks, in order.
            batches: the calibration batches.

        Raises:
            CorruptStateError: naming a block file that cannot be read (truncated, not a
                safetensors file), before any weight changes.
            PPQConfigError: when the progress folder's place is a file.
        """
        for parent in (self.root.parent, self.root):
            if parent.exists() and not parent.is_dir():
                raise PPQConfigError(
                    f"the block progress of stage {self.stage!r} goes under {self.root}, but "
                    f"{parent} is a file: give block_checkpoints a folder (or False), or move "
                    "the file. Nothing was changed."
                )
        try:
            data = batches_digest(batches)
        except UnhashableBatchError as error:
            self._turn_off(
                f"its calibration batches hold a {error} (only tensors, numbers, strings, "
                "dicts, lists and tuples can be fingerprinted)"
            )
            return
        parts = {
            "format": FORMAT,
            "stage": self.identity,
            "data": data,
            "structure": structure_digest(model),
            "outside": outside_digest(model, block_names),
        }
        self.fingerprint = hashlib.blake2b(
            json.dumps(parts, sort_keys=True).encode(), digest_size=20
        ).hexdigest()
        prefix = _folder_name(self.stage)
        self.folder = self.root / f"{prefix}-{self.fingerprint[:16]}"
        self._warn_others(prefix, parts)
        self.files = self._scan()
        if not self.folder.exists():
            write_json(self.folder / "progress.json", {**parts, "name": self.stage})

    def _warn_others(self, prefix: str, parts: dict[str, str]) -> None:
        """Warn about folders of this stage's name written for another fingerprint."""
        if not self.root.is_dir():
            return
        for other in sorted(self.root.glob(f"{prefix}-*")):
            if other == self.folder or not other.is_dir():
                continue
            try:
                recorded = json.loads((other / "progress.json").read_text())
            except (OSError, ValueError):
                recorded = {}
            if recorded.get("name", self.stage) != self.stage:
                continue  # another stage whose name starts alike
            labels = {
                "stage": "the stage's configuration",
                "data": "the calibration data",
                "structure": "the model's structure",
                "outside": "the model's weights outside its blocks",
                "format": "the file format",
            }
            differ = [labels[k] for k in labels if recorded.get(k) != parts[k]] or ["unknown"]
            verb = "differs" if len(differ) == 1 else "differ"
            warnings.warn(
                f"[ppq] stage {self.stage!r}: the block progress in {other} is not used: it was "
                f"written for another run ({', '.join(differ)} {verb}). This run starts its own "
                f"in {self.folder}; delete {other} if that run will not be continued.",
                ProgressMismatchWarning,
                stacklevel=2,
            )

    def _scan(self) -> dict[int, Path]:
        """The block files of this folder that belong to this fingerprint, by index; checks
        that each can be opened.

        Raises:
            CorruptStateError: naming a file that cannot be read.
        """
        files: dict[int, Path] = {}
        if self.folder is None or not self.folder.is_dir():
            return files
        for path in sorted(self.folder.glob("block-*.safetensors")):
            metadata = self._metadata(path)
            if metadata.get("fingerprint") != self.fingerprint:
                warnings.warn(
                    f"[ppq] stage {self.stage!r}: {path} was written for another run (its "
                    "fingerprint differs from its folder's); it is not used and is deleted.",
                    ProgressMismatchWarning,
                    stacklevel=3,
                )
                path.unlink(missing_ok=True)
                continue
            files[int(metadata["index"])] = path
        return files

    def _corrupt(self, path: Path, why: str) -> CorruptStateError:
        return CorruptStateError(
            f"the block progress file {path} of stage {self.stage!r} cannot be used: {why}. "
            "It was cut short (a full disk, a kill of the file system) or changed after it was "
            f"written. Nothing was changed by it: delete {path} (that block and the ones "
            f"after it are then compressed again) or the whole folder {path.parent} (the stage "
            "starts from its first block), and run again."
        )

    def _metadata(self, path: Path) -> dict[str, str]:
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise self._corrupt(path, f"it cannot be read ({error})") from error
        if metadata.get("format") != FORMAT or not metadata.get("index", "").isdigit():
            raise self._corrupt(path, f"it is not a {FORMAT} file")
        return metadata

    # -- per block -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether progress is kept (begun, and not turned off)."""
        return self.folder is not None and self._off is None

    def resumable(self, index: int, block: nn.Module) -> bool:
        """Whether block ``index`` has a saved result to load instead of compressing it:
        a file exists and the block's tensors now are those the file was computed from. Records
        the block's hash for :meth:`save`. A block whose tensors differ: its file and every
        later one are deleted with a :class:`ProgressMismatchWarning`.

        Raises:
            CorruptStateError: naming a file that cannot be read.
        """
        if not self.active:
            return False
        before = state_digest(block.state_dict(keep_vars=True))
        self._before[index] = before
        path = self.files.get(index)
        if path is None:
            return False
        recorded = self._metadata(path).get("before")
        if recorded == before:
            return True
        later = sorted(i for i in self.files if i >= index)
        warnings.warn(
            f"[ppq] stage {self.stage!r}: block {index}'s weights differ from those its saved "
            f"progress ({path}) was computed from (an earlier stage produced other weights, or "
            f"the model changed); its file and the {len(later) - 1} after it are deleted and "
            "those blocks compressed again.",
            ProgressMismatchWarning,
            stacklevel=2,
        )
        for i in later:
            self.files.pop(i).unlink(missing_ok=True)
        return False

    def load(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s saved state into ``block`` and its metrics into
        :attr:`metrics`, after checking the file's checksum.

        Raises:
            CorruptStateError: naming the file when it cannot be read or its checksum differs
                (``block`` unchanged).
        """
        path = self.files[index]
        try:
            raw = path.read_bytes()
            tensors = load_safetensors(raw)
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            extra = json.loads(metadata["extra"])
            metrics = json.loads(metadata["metrics"])
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            raise self._corrupt(path, f"it cannot be read ({error})") from error
        state = {**tensors, **extra}
        if _checksum(state, metrics, metadata) != metadata.get("checksum"):
            raise self._corrupt(path, "its checksum does not match its contents")
        self.loader(block, state)
        self.metrics.update(metrics)
        self._seen_metrics.update(self.metrics)
        self.resumed.append(index)

    def save(self, index: int, name: str, block: nn.Module) -> None:
        """Write block ``index``'s state after the stage (atomically, flushed to disk) with the
        metrics added since the last block.

        Raises:
            DiskFullError: naming the file when the disk has no room (nothing half-written).
        """
        if not self.active:
            return
        state = block_state(block)
        tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        extra = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        metrics = {k: v for k, v in self.metrics.items() if k not in self._seen_metrics}
        self._seen_metrics.update(metrics)
        try:
            extra_text, metrics_text = json.dumps(extra), json.dumps(metrics)
            exact = json.loads(extra_text) == extra and json.loads(metrics_text) == metrics
        except (TypeError, ValueError):
            exact = False
        if not exact:
            self._turn_off(f"block {name}'s state holds values JSON cannot keep exactly")
            return
        metadata = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "index": str(index),
            "block": name,
            "before": self._before[index],
            "extra": extra_text,
            "metrics": metrics_text,
        }
        metadata["checksum"] = _checksum({**tensors, **extra}, metrics, metadata)
        payload = save_safetensors(tensors, metadata=metadata)
        path = self.folder / f"block-{index:05d}.safetensors"
        with atomic_write(path, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.files[index] = path
        self.saved.append(index)

    # -- a greedy search's steps (SLEB) ----------------------------------------------------------
    def load_steps(self) -> list[dict[str, Any]]:
        """The steps a search saved with :meth:`save_steps` for this fingerprint (after
        :meth:`begin` with no block names: the whole model is fingerprinted), or ``[]``.

        Raises:
            CorruptStateError: naming ``steps.json`` when it cannot be read or its checksum
                differs.
        """
        if not self.active:
            return []
        path = self.folder / "steps.json"
        if not path.exists():
            return []
        try:
            recorded = json.loads(path.read_text())
            steps, checksum = recorded["steps"], recorded["checksum"]
            fingerprint = recorded["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self._corrupt(path, f"it cannot be read ({error})") from error
        if _steps_checksum(steps, fingerprint) != checksum or not isinstance(steps, list):
            raise self._corrupt(path, "its checksum does not match its contents")
        if fingerprint != self.fingerprint:
            return []
        self.resumed = list(range(len(steps)))
        return steps

    def corrupt_steps(self, why: str) -> CorruptStateError:
        """The error of a ``steps.json`` whose steps do not fit the model (``why``)."""
        return self._corrupt(self.folder / "steps.json", why)

    def save_steps(self, steps: list[dict[str, Any]]) -> None:
        """Write every step of the search so far (atomically, flushed to disk)."""
        if not self.active:
            return
        record = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "steps": steps,
            "checksum": _steps_checksum(steps, self.fingerprint),
        }
        with atomic_write(self.folder / "steps.json") as handle:
            handle.write(json.dumps(record, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        self.saved.append(len(steps) - 1)

    def finish(self) -> None:
        """The stage succeeded: delete its progress folder."""
        if self.folder is not None and self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)
        with_files = self.root.is_dir() and any(self.root.iterdir())
        if self.root.is_dir() and not with_files:
            self.root.rmdir()

    def _turn_off(self, why: str) -> None:
        self._off = why
        warnings.warn(
            f"[ppq] stage {self.stage!r} runs without saving its progress per block: {why}. A "
            "run killed part-way starts this stage from its first block.",
            ProgressOffWarning,
            stacklevel=3,
        )


def _steps_checksum(steps: Any, fingerprint: Any) -> str:
    text = json.dumps({"steps": steps, "fingerprint": fingerprint}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _checksum(state: Mapping[str, Any], metrics: Any, metadata: Mapping[str, str]) -> str:
    """A hash of a block file's contents: its state, metrics and identifying metadata."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(state_digest(state).encode())
    digest.update(json.dumps(metrics, sort_keys=True).encode())
    for key in ("format", "fingerprint", "index", "block", "before"):
        digest.update(f"{key}={metadata.get(key)};".encode())
    return digest.hexdigest()
