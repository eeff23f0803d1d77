"""``export(model, format, path)``: validate, write the format into an atomic folder, report sizes.

Example (Python)::

    import ppq_lightning
    ppq_lightning.export(module, "compressed-tensors", "exports/smollm2_gptq4")

Example (command line)::

    ppq export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --format ppq --path out/
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ppq_lightning.compressed.accounting import compression_summary, counted_layers
from ppq_lightning.compressed.state import STATE_NAME, compressed_modules
from ppq_lightning.errors import PPQConfigError, check_bool, check_choice
from ppq_lightning.export import compressed_tensors, gguf, native, peft_adapters
from ppq_lightning.export.architecture import unwrap
from ppq_lightning.export.checkpoint import load_lightning_checkpoint
from ppq_lightning.export.folder import (
    CHECKSUMS,
    atomic_folder,
    check_target,
    checksums,
    folder_bytes,
    write_manifest,
)
from ppq_lightning.modules.targets import untaken_layers

WRITERS = {
    "ppq": native.save,
    "compressed-tensors": compressed_tensors.save,
    "gguf": gguf.save,
    "peft": peft_adapters.save,
}
FORMATS = tuple(WRITERS)
CHECKS = {
    "compressed-tensors": compressed_tensors.check,
    "gguf": gguf.check,
    "peft": peft_adapters.check,
}


def export(
    model: nn.Module,
    format: str,
    path: str | Path,
    overwrite: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write a compressed model in ``format`` into the folder ``path``.

    Args:
        model: a LightningModule of this project (``CausalLMModule``, ``ImageClassifierModule``)
            or the network itself, compressed in memory.
        format: ``"ppq"`` (native, bit-exact, any model), ``"compressed-tensors"`` (transformers,
            vLLM), ``"gguf"`` (llama.cpp) or ``"peft"`` (base model + LoRA adapters).
        path: the folder to write; it must not exist unless ``overwrite``. A symlink to a
            folder is written through.
        overwrite: replace an earlier export at ``path`` (a folder whose ``export.json`` lists
            every file in it, or an empty folder), only once the new one is complete; any other
            folder or file is refused.
        dtype: compressed-tensors only: the dtype of the exported model (``float32``,
            ``float16``, ``bfloat16``; default: the model's). Grids are rounded to it before the
            codes are computed, so the export is the same model in that dtype.

    Returns:
        The manifest written to ``path/export.json`` (format, files, their sizes and sha256,
        compression rates).

    Raises:
        PPQConfigError: on an unknown format; a path that is empty, ``.``, a dangling symlink, a
            file, an existing folder without ``overwrite``, or with it a folder that is not an
            earlier export; a model with no compressed layers, or one the format cannot
            represent (scales its file's dtype cannot hold included); nothing is written then.
        OSError: when writing fails (disk full, read-only folder), naming the path; the path
            holds what it held before and no hidden folder is left.
    """
    check_choice("format", format, WRITERS)
    check_bool("overwrite", overwrite)
    if dtype is not None and format != "compressed-tensors":
        raise PPQConfigError(f"dtype={dtype!r} applies to format='compressed-tensors' only.")
    target = check_target(path, overwrite)
    network = unwrap(model)
    if not any(True for _ in compressed_modules(model)):
        raise PPQConfigError(
            "the model has no compressed layers (no stage recorded a mask, grid or edit); "
            "export a dense model with its library's save_pretrained / save_file instead."
        )
    options = {"dtype": dtype} if format == "compressed-tensors" else {}
    if format in CHECKS:
        CHECKS[format](model, **options)
    b_orig = int(getattr(model, "b_orig", 16))
    summary = compression_summary(model, b_orig)  # the LightningModule's records included
    start = time.perf_counter()
    with atomic_folder(target, overwrite) as folder:
        written = WRITERS[format](model, folder, **options)
        seconds = time.perf_counter() - start
        manifest = _manifest(format, network, folder, written, summary, b_orig, seconds)
        write_manifest(folder, manifest)
    return manifest


def _manifest(
    format: str,
    network: nn.Module,
    folder: Path,
    written: dict[str, Any],
    summary: Any,
    b_orig: int,
    seconds: float,
) -> dict[str, Any]:
    """What ``export.json`` says: sizes of the files and of the counted layers in them."""
    digests = checksums(folder)  # every file, subfolders (peft's base/, adapter/) included
    files = {name: (folder / name).stat().st_size for name in digests}
    unique = {  # the dense model's floats, tied weights (embeddings, LM head) once
        (t.data_ptr(), t.numel()): t.numel()
        for key, t in network.state_dict().items()
        if isinstance(t, Tensor) and t.is_floating_point() and STATE_NAME not in key
    }
    dense_bytes = sum(unique.values()) * b_orig // 8
    layer_bytes = written.get("layer_bytes")
    manifest: dict[str, Any] = {
        "format": format,
        "files": files,
        CHECKSUMS: digests,
        "bytes": folder_bytes(folder),
        "dense_bytes_at_b_orig": dense_bytes,
        "b_orig": b_orig,
        "measured_C": summary.measured_C,
        "nominal_C": summary.nominal_C,
        "export_seconds": seconds,
    }
    if layer_bytes is not None:
        # the counted layers (those the measured C counts) as the files store them
        counted = counted_layers(network)  # and, dense, the layers no method takes
        manifest["counted_layers"] = len(counted.keys() | untaken_layers(network).keys())
        manifest["counted_layer_bytes"] = layer_bytes
        manifest["file_C"] = b_orig * summary.n_weights / (8 * layer_bytes) if layer_bytes else 0
    manifest.update({k: v for k, v in written.items() if k != "layer_bytes"})
    return manifest


def export_lightning_checkpoint(
    ckpt: str | Path, format: str, path: str | Path, **kwargs: Any
) -> dict[str, Any]:
    """Export the compressed model of a Lightning checkpoint (read with ``weights_only``).

    Raises:
        PPQConfigError: as :func:`export`, or for a checkpoint that is missing, unsafe to
            unpickle, or not of a LightningModule of this project.
    """
    check_choice("format", format, WRITERS)
    return export(load_lightning_checkpoint(ckpt), format, path, **kwargs)
