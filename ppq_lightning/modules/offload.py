"""Weights on disk: a model's tensors memory-mapped from files, resident one block at a time.

A model whose weights do not fit in memory (or on the compute device) keeps every parameter and
buffer as a **view of a memory-mapped file**: the model's own safetensors files, mapped
copy-on-write (the files are never written), or files this module wrote. To the rest of the code
(and to the user's) they are ordinary CPU tensors: a forward pass, ``state_dict()``, the
compression summary and the exporters read them as usual, and the operating system pages them in
from disk on access. What keeps memory at one block is discipline in three places:

- :meth:`DiskWeights.materialized` is how a block is compressed: its tensors are copied to the
  compute device (or cloned on the CPU), the method edits the copies, and on exit the block's
  tensors, new ones included (compression states, factors), are written to a new file in the
  store's folder, mapped back, and the pages of the old views are released. Mapped views are
  never written, so they stay exactly the tensors before the stage: the rollback keeps them by
  reference (:func:`snapshot`), at no memory cost.
- :meth:`DiskWeights.release` drops a module's pages from the process's resident memory after a
  pass (they stay in the page cache, and are read again on the next access). A page that code
  wrote into directly (copy-on-write made it private memory) is never dropped: its values would
  be lost (``/proc/self/pagemap`` says which pages are private).
- :func:`streaming` runs a model's blocks the same way for evaluation: each block's pages are
  released after its forward, and with a ``device`` each block is copied there for its forward
  alone (weights on the CPU, one block on the GPU).

Why hand-written: accelerate's ``disk_offload``/``dispatch_model`` keep offloaded weights on the
meta device behind forward hooks, so every piece of code that reads a weight outside a forward
(the stage's checks, invariants, the C summary, exporters, ``state_dict``) would need its own
hook, and its offload stores (``OffloadedWeightsLoader``) are read-only: a compressed block (new
masks, scales, replaced layers) has no way back. Memory maps keep those readers unchanged, and
writing a block back is one ``safetensors`` file. ``safetensors`` gives the file format; the
mapping is Python's ``mmap`` with ``torch.frombuffer`` (zero copy).

Example (YAML, through ``CausalLMModule``)::

    model:
      class_path: ppq_lightning.models.CausalLMModule
      init_args: {model: path/to/llama-3-8b, dtype: bfloat16, offload_folder: offload/}
"""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ppq_lightning.errors import PPQConfigError

PAGE = mmap.PAGESIZE
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _map_views(path: Path) -> tuple[MappedFile, dict[str, Tensor]]:
    """Map the safetensors file ``path`` and return it with a zero-copy view of each tensor.

    Raises:
        PPQConfigError: on a file that is not safetensors, or a dtype it cannot map.
    """
    header, data = read_safetensors_header(path)
    mapped = MappedFile(path)
    views = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise PPQConfigError(
                f"{path}: tensor {name} has dtype {entry['dtype']}, which "
                "cannot be memory-mapped; convert the file first."
            )
        views[name] = mapped.view(data + entry["data_offsets"][0], dtype, entry["shape"])
    return mapped, views


class MappedFile:
    """A file mapped copy-on-write; its tensors are zero-copy views (``torch.frombuffer``).

    Args:
        path: the file (never written through the mapping).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self.start = torch.frombuffer(self.map, dtype=torch.uint8).data_ptr()
        self.end = self.start + len(self.map)

    def view(self, offset: int, dtype: torch.dtype, shape: list[int]) -> Tensor:
        """The tensor of ``dtype`` and ``shape`` stored at byte ``offset``."""
        count = 1
        for size in shape:
            count *= size
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=count, offset=offset)
        return flat.view(shape)

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor``'s memory lies in this mapping."""
        return tensor.device.type == "cpu" and self.start <= tensor.data_ptr() < self.end

    def release(self, tensor: Tensor) -> None:
        """Drop the whole pages of ``tensor`` from resident memory, unless one of them is
        private (written through the mapping): dropping it would revert that write."""
        begin = tensor.data_ptr() - self.start
        end = begin + tensor.numel() * tensor.element_size()
        first, last = -(-begin // PAGE) * PAGE, end // PAGE * PAGE
        if last > first and not _private_pages(self.start + first, self.start + last):
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)


def _private_pages(start: int, end: int) -> bool:
    """Whether a present page of ``[start, end)`` (page-aligned addresses of this process) is
    private memory rather than a page of its file (``/proc/self/pagemap``: bit 63 present,
    bit 61 file page). Where pagemap cannot be read, every page counts as private."""
    try:
        with open("/proc/self/pagemap", "rb") as handle:
            handle.seek(start // PAGE * 8)
            entries = handle.read((end - start) // PAGE * 8)
    except OSError:
        return True
    for (entry,) in struct.iter_unpack("<Q", entries):
        if entry >> 63 & 1 and not entry >> 61 & 1:
            return True
    return False


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file and the byte offset of its data.

    Raises:
        PPQConfigError: naming the file when it is not a readable safetensors file.
    """
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header, 8 + size
    except (OSError, ValueError, struct.error) as err:
        raise PPQConfigError(f"{path} is not a readable safetensors file ({err}).") from err


@dataclass
class Traffic:
    """What a store moved: bytes and seconds reading (materializing) and writing back, and the
    most tensor bytes materialized at once (``peak_resident``)."""

    read_bytes: int = 0
    read_seconds: float = 0.0
    written_bytes: int = 0
    write_seconds: float = 0.0
    resident: int = 0
    peak_resident: int = 0
    blocks_written: int = 0


_STORES: weakref.WeakSet[DiskWeights] = weakref.WeakSet()
STORE_ATTRIBUTE = "_ppq_disk_weights"
"""The attribute by which a model holds its :class:`DiskWeights` (the stores themselves are
looked up by address: :func:`disk_weights`)."""


def _tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, Tensor]]:
    """``(owner, attribute, dotted name, tensor)`` of every parameter and buffer of ``module``
    and its children (a tensor shared by two owners appears under each)."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attribute, tensor in itertools.chain(owner._parameters.items(), owner._buffers.items()):
            if tensor is not None:
                yield owner, attribute, f"{prefix}.{attribute}" if prefix else attribute, tensor


def _point(owner: nn.Module, attribute: str, tensor: Tensor) -> None:
    """Make ``owner.<attribute>`` hold ``tensor``'s values (a Parameter keeps its identity; a
    Parameter on the meta device, which cannot take a CPU tensor, is replaced, and so is every
    other reference to it: ``_fill_meta``)."""
    current = owner._parameters.get(attribute)
    if current is not None and current.device.type == "meta":
        owner._parameters[attribute] = nn.Parameter(tensor, current.requires_grad)
    elif current is not None:
        current.data = tensor
    else:
        owner._buffers[attribute] = tensor


def _write_error(path: Path, err: Exception) -> OSError:
    """An ``OSError`` naming the offload folder's file for a failed write (its errno kept, or
    read from safetensors' message: a full disk stays recognisable as one)."""
    number = getattr(err, "errno", None)
    if number is None:
        text = str(err)
        number = next(
            (
                code
                for word, code in (
                    ("No space", errno.ENOSPC),
                    ("too large", errno.EFBIG),
                    ("Disk quota", errno.EDQUOT),
                )
                if word in text
            ),
            errno.EIO,
        )
    return OSError(number, f"cannot write {path} in offload_folder ({err})", os.fspath(path))


def _dead(pid: str) -> bool:
    """Whether ``pid`` (text from a file name) is a process that no longer runs: not this one,
    not one alive under another user."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, under another user
    return False


def _delete_stale(folder: Path) -> None:
    """Delete the files a killed process left in ``folder`` (``ppq-<pid>-...``, that pid no
    longer running): a SIGKILL or an out-of-memory kill runs no clean-up."""
    for path in folder.glob("ppq-*.safetensors"):
        if _dead(path.name.split("-")[1]):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def spill_folder() -> Iterator[Path]:
    """A temporary folder for :func:`snapshot`'s files, deleted when the block ends: in
    ``$TMPDIR``, named ``ppq-rollback-<pid>-...``. The folders a killed process left (a
    SIGKILL runs no clean-up, and a rollback of a model in memory spills up to its size) are
    deleted first."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob("ppq-rollback-*-*"):
        if _dead(stale.name.split("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"ppq-rollback-{os.getpid()}-") as folder:
        yield Path(folder)


def _delete_files(paths: set[Path]) -> None:
    for path in list(paths):
        path.unlink(missing_ok=True)  # a mapping still open keeps its data until closed
    paths.clear()


class DiskWeights:
    """A store of memory-mapped weights; blocks written back go to ``folder``.

    Args:
        folder: where written-back blocks go (created; files this store wrote are deleted when
            no tensor points at them any more).

    Raises:
        PPQConfigError: when ``folder`` cannot be created or written.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".probe-"):
                pass
        except OSError as err:
            raise PPQConfigError(
                f"offload_folder={os.fspath(folder)!r} cannot be written ({err}): give a "
                "folder on a disk with room for the compressed weights."
            ) from err
        self.files: list[MappedFile] = []
        self.traffic = Traffic()
        self._counter = itertools.count()
        self._written: set[Path] = set()
        self._prefix = f"ppq-{os.getpid()}-{id(self):x}"
        self.models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        _delete_stale(self.folder)
        # the files it wrote go when the store does (or at exit): a cache, not a result
        weakref.finalize(self, _delete_files, self._written)
        _STORES.add(self)

    # -- mapping ---------------------------------------------------------------------------
    def map_file(self, path: str | os.PathLike[str]) -> dict[str, Tensor]:
        """Zero-copy views of every tensor of a safetensors file (the file is never written).

        Raises:
            PPQConfigError: on a file that is not safetensors, or a dtype it cannot map.
        """
        mapped, views = _map_views(Path(path))
        self.files.append(mapped)
        return views

    def file_of(self, tensor: Tensor) -> MappedFile | None:
        """The mapped file ``tensor`` is a view of, or None."""
        return next((f for f in self.files if f.holds(tensor)), None)

    def adopt(self, model: nn.Module) -> None:
        """Count ``model`` among the models whose tensors keep this store's files
        (:meth:`collect`); the model keeps the store alive."""
        model.__dict__[STORE_ATTRIBUTE] = self
        self.models.add(model)

    def collect(self) -> None:
        """Delete every file this store wrote that no tensor of its models points at any more
        (an older version of a block, the blocks of a stage that failed). Its mapping stays
        open (a view may still hold it: a rollback's copy) and is known to the store, so the
        disk space comes back when the store goes."""
        referenced = set()
        for model in list(self.models):
            for _, _, _, tensor in _tensors(model):
                mapped = self.file_of(tensor)
                if mapped is not None:
                    referenced.add(id(mapped))
        for mapped in list(self.files):
            if mapped.path not in self._written or id(mapped) in referenced:
                continue
            mapped.path.unlink(missing_ok=True)
            self._written.discard(mapped.path)

    def __deepcopy__(self, memo: dict[int, Any]) -> DiskWeights:
        return self  # one store for a model and its copies (files cannot be copied)

    # -- residency ------------------------------------------------------------------------
    def release(self, module: nn.Module) -> None:
        """Drop ``module``'s mapped pages from resident memory (values are kept)."""
        for _, _, _, tensor in _tensors(module):
            mapped = self.file_of(tensor)
            if mapped is not None:
                mapped.release(tensor)

    @contextlib.contextmanager
    def materialized(
        self, module: nn.Module, device: torch.device | str | None = None, write: bool = True
    ) -> Iterator[None]:
        """Copy ``module``'s mapped tensors to ``device`` (default: cloned on the CPU) for the
        block; on a normal exit write every tensor of ``module`` back (:meth:`write_back`), or
        with ``write=False`` (a block only run, not edited) put the views back. On an error the
        mapped views (unchanged) are put back and the error propagates.

        Args:
            module: the block (or layer) to edit.
            device: where its tensors live while it is edited.
            write: whether the block was edited (written back on exit).
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        views = []
        start = time.perf_counter()
        size = 0
        for owner, attribute, _, tensor in _tensors(module):
            if self.file_of(tensor) is None:
                continue
            views.append((owner, attribute, tensor.detach()))  # the view, not the Parameter
            _point(owner, attribute, tensor.to(device, copy=True))
            size += tensor.numel() * tensor.element_size()
        self._account_read(size, time.perf_counter() - start)
        try:
            yield
            if write:
                self.write_back(module)
        except BaseException:
            for owner, attribute, view in views:
                _point(owner, attribute, view)
            raise
        finally:
            self.traffic.resident -= size
        if not write:
            for owner, attribute, view in views:
                _point(owner, attribute, view)
        for _, _, view in views:
            mapped = self.file_of(view)
            if mapped is not None:
                mapped.release(view)
        self.collect()

    def _account_read(self, size: int, seconds: float) -> None:
        traffic = self.traffic
        traffic.read_bytes += size
        traffic.read_seconds += seconds
        traffic.resident += size
        traffic.peak_resident = max(traffic.peak_resident, traffic.resident)

    def write_back(self, module: nn.Module) -> None:
        """Write every tensor of ``module`` not already a view of this store into a new file
        of the folder (atomically), and point ``module`` at the file's views."""
        start = time.perf_counter()
        pending: dict[str, tuple[nn.Module, str, Tensor]] = {}
        by_data: dict[int, str] = {}
        payload: dict[str, Tensor] = {}
        for owner, attribute, name, tensor in _tensors(module):
            if tensor.device.type == "cpu" and self.file_of(tensor) is not None:
                continue
            pending[name] = (owner, attribute, tensor)
            key = tensor.data_ptr()
            if key in by_data and payload[by_data[key]].shape == tensor.shape:
                continue  # one tensor under two names is written once
            by_data[key] = name
            payload[name] = tensor.detach().to("cpu").contiguous()
        if not pending:
            return
        path = self.folder / f"{self._prefix}-block-{next(self._counter):05d}.safetensors"
        try:
            _write(payload, path)
        except Exception as err:  # safetensors' own error on a full disk is no OSError
            Path(path.with_name("." + path.name + ".partial")).unlink(missing_ok=True)
            self.collect()
            raise _write_error(path, err) from err
        self._written.add(path)
        views = self.map_file(path)
        for name, (owner, attribute, tensor) in pending.items():
            source = by_data.get(tensor.data_ptr(), name)
            _point(owner, attribute, views[source])
        traffic = self.traffic
        traffic.written_bytes += sum(t.numel() * t.element_size() for t in payload.values())
        traffic.write_seconds += time.perf_counter() - start
        traffic.blocks_written += 1


def disk_weights(module: nn.Module) -> DiskWeights | None:
    """The store whose files ``module``'s first mapped tensor is a view of, or None (weights in
    memory)."""
    if not _STORES:
        return None
    stores = list(_STORES)
    for _, _, _, tensor in _tensors(module):
        for store in stores:
            if store.file_of(tensor) is not None:
                return store
    return None


def _write(tensors: dict[str, Tensor], path: Path) -> None:
    """Write ``tensors`` (on the CPU) to the safetensors file ``path`` atomically (a temporary
    name, then a rename); tensors that share memory with an earlier one are copied first
    (safetensors refuses shared memory)."""
    seen: set[int] = set()
    payload = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        payload[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    partial = path.with_name("." + path.name + ".partial")
    save_file(payload, partial)
    os.replace(partial, path)


def copy_model(model: Any) -> Any:
    """``copy.deepcopy(model)``, except that weights on disk are shared, not read into memory:
    the copy's tensors are the same mapped views (never written: a stage edits copies and
    writes them to new files), so copying a model that does not fit in memory costs nothing.
    What a study does to explore orders from a shared prefix."""
    if not isinstance(model, nn.Module) or disk_weights(model) is None:
        return copy.deepcopy(model)
    memo: dict[int, Any] = {}
    for _, _, _, tensor in _tensors(model):
        if id(tensor) not in memo and stored(tensor):
            view = tensor.detach()
            memo[id(tensor)] = (
                nn.Parameter(view, tensor.requires_grad)
                if isinstance(tensor, nn.Parameter)
                else view
            )
    twin = copy.deepcopy(model, memo)  # the store itself is shared (its __deepcopy__)
    store = disk_weights(twin)
    if store is not None:
        store.models.add(twin)
    return twin


def released(module: nn.Module) -> None:
    """Drop ``module``'s mapped pages from resident memory if its weights are on disk (a
    no-op otherwise): what a reader of every layer calls after each."""
    store = disk_weights(module)
    if store is not None:
        store.release(module)


def stored(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a view of a :class:`DiskWeights` store's file."""
    return any(store.file_of(tensor) is not None for store in list(_STORES))


def snapshot(tensors: dict[str, Tensor], spill: Path | None) -> dict[str, Tensor]:
    """Copies of ``tensors`` that cost no resident memory: a view of a mapped file is kept as
    it is (mapped views are never written: :meth:`DiskWeights.materialized`); any other tensor
    is written into a file of ``spill`` and mapped (on the CPU); without ``spill``, copied to the
    CPU.

    Args:
        tensors: ``{name: tensor}`` to keep.
        spill: a folder for the others (the caller deletes it), or None.
    """
    kept, written = {}, {}
    for name, tensor in tensors.items():
        if stored(tensor):
            kept[name] = tensor.detach()  # the memory, not the Parameter (its .data moves)
        elif spill is None or tensor.numel() * tensor.element_size() < PAGE:
            kept[name] = tensor.detach().to("cpu", copy=True)
        else:
            written[name] = tensor.detach().to("cpu").contiguous()
    if written:
        handle, file_name = tempfile.mkstemp(dir=spill, suffix=".safetensors")
        os.close(handle)
        path = Path(file_name)
        _write(written, path)
        kept.update(_map_views(path)[1])
    return kept


def stream_blocks(
    blocks: Iterable[nn.Module], device: torch.device | str | None = None
) -> list[RemovableHandle]:
    """Run ``blocks`` of a model whose weights are on disk one at a time: each block's mapped
    pages are released after its forward; with ``device``, each block is copied there for its
    forward alone (its inputs follow it, its output comes back to the CPU).

    Args:
        blocks: the model's blocks (decoder layers, residual blocks, ...).
        device: where each block runs; None: where its weights are (the CPU).

    Returns:
        The hooks' handles (``handle.remove()`` undoes it).
    """
    target = torch.device(device) if device is not None else None
    handles = []

    def onto(module: nn.Module, args: Any, kwargs: Any) -> Any:
        views = [(o, a, t.detach()) for o, a, _, t in _tensors(module)]
        module.__dict__["_ppq_views"] = views
        for owner, attribute, tensor in views:
            _point(owner, attribute, tensor.to(target))
        return move_data_to_device(args, target), move_data_to_device(kwargs, target)

    def back(module: nn.Module, args: Any, output: Any) -> Any:
        for owner, attribute, view in module.__dict__.pop("_ppq_views", ()):
            _point(owner, attribute, view)
        store = disk_weights(module)
        if store is not None:
            store.release(module)
        return move_data_to_device(output, "cpu") if target is not None else output

    for block in blocks:
        if target is not None:
            handles.append(block.register_forward_pre_hook(onto, with_kwargs=True))
        handles.append(block.register_forward_hook(back))
    return handles


def stream_model(
    model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str | None = None
) -> list[RemovableHandle]:
    """:func:`stream_blocks` on ``blocks`` and on every other module of ``model`` that holds
    tensors itself (the embedding, the final norm, the head), so that after a forward nothing
    of the weights stays resident."""
    blocks = list(blocks)
    inside = {id(m) for block in blocks for m in block.modules()}
    others = [
        module
        for module in model.modules()
        if id(module) not in inside
        and any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
    ]
    return stream_blocks([*blocks, *others], device)


@contextlib.contextmanager
def streaming(
    blocks: Iterable[nn.Module], device: torch.device | str | None = None
) -> Iterator[None]:
    """:func:`stream_blocks` for the duration of a ``with`` block."""
    handles = stream_blocks(blocks, device)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def map_checkpoint(
    model: nn.Module, files: Iterable[str | os.PathLike[str]], store: DiskWeights
) -> None:
    """Point every parameter and persistent buffer of ``model`` (built on the meta device,
    e.g. under ``accelerate.init_empty_weights``) at the tensors of safetensors ``files`` by
    name. A tensor stored in another dtype than the model's is converted and written to the
    store's folder (in files of at most 256 MiB, so conversion holds no more than that).

    Args:
        model: the model, its weights on the meta device.
        files: the checkpoint's ``*.safetensors`` files.
        store: the store that maps them (and holds the converted tensors).

    Raises:
        PPQConfigError: naming the first tensor the files lack, or whose shape differs.
    """
    store.adopt(model)
    views: dict[str, Tensor] = {}
    for path in files:
        views.update(store.map_file(path))
    converted: dict[str, tuple[nn.Module, str, Tensor]] = {}
    owners = {id(t): (o, a) for o, a, _, t in _tensors(model) if isinstance(t, nn.Parameter)}

    def flush() -> None:
        path = store.folder / f"{store._prefix}-converted-{next(store._counter):05d}.safetensors"
        _write({name: tensor for name, (_, _, tensor) in converted.items()}, path)
        store._written.add(path)
        mapped = store.map_file(path)
        for name, (owner, attribute, _) in converted.items():
            _point(owner, attribute, mapped[name])
        converted.clear()

    for owner, attribute, name, tensor in _tensors(model):
        view = views.get(name)
        if tensor.device.type != "meta" or view is None:
            continue
        if tuple(view.shape) != tuple(tensor.shape):
            raise PPQConfigError(
                f"{name}: the checkpoint holds shape {tuple(view.shape)}, the model "
                f"{tuple(tensor.shape)}: is it the checkpoint of this architecture?"
            )
        if view.dtype == tensor.dtype:
            _point(owner, attribute, view)
            continue
        converted[name] = (owner, attribute, view.to(tensor.dtype))
        _point(owner, attribute, converted[name][2])
        if sum(t.numel() * t.element_size() for _, _, t in converted.values()) > 2**28:
            flush()
    if converted:
        flush()
    _share_replaced(model, owners)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [name for _, _, name, tensor in _tensors(model) if tensor.device.type == "meta"]
    if missing:
        raise PPQConfigError(
            f"the checkpoint files lack {len(missing)} tensor(s) of the model, the first "
            f"{missing[0]!r}: is it the checkpoint of this architecture?"
        )


def _share_replaced(model: nn.Module, owners: dict[int, tuple[nn.Module, str]]) -> None:
    """A meta Parameter held by two modules (tied weights) and replaced in the first: the
    second gets the same new Parameter (``owners``: each meta Parameter's first holder, by
    ``id``, taken before any was replaced)."""
    for owner, attribute, _, tensor in list(_tensors(model)):
        if tensor.device.type == "meta" and id(tensor) in owners:
            first, name = owners[id(tensor)]
            replacement = first._parameters.get(name)
            if replacement is not None and replacement.device.type != "meta":
                owner._parameters[attribute] = replacement


def offload_to_disk(model: nn.Module, folder: str | os.PathLike[str]) -> DiskWeights:
    """Move an in-memory ``model``'s weights to files in ``folder`` and map them (one file per
    top-level child), so that compression and evaluation hold one block at a time.

    Args:
        model: the model (its tensors on the CPU).
        folder: where its weights go.

    Raises:
        PPQConfigError: when ``folder`` cannot be written.
    """
    store = DiskWeights(folder)
    store.adopt(model)
    for child in model.children():
        store.write_back(child)
    store.write_back(model)  # tensors the model holds itself
    return store
