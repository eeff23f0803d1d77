"""GGUF export for llama.cpp, written with the ``gguf`` package's writer.

A layer's block type is decided by its grid kind first (``export.grid_kinds``), then, for
integer grids, by the block's arithmetic:

- K-quant grids -> their own ``Q4_K``, ``Q5_K``, ``Q6_K`` super-blocks
  (``ops.kquants.pack_kquant``), bit-exact;
- ``mxfp4`` -> ``MXFP4`` (an E8M0 byte and 16 bytes of E2M1 nibbles per 32 weights, packed
  here), bit-exact;
- integer, groups of 32: 4-bit symmetric -> ``Q4_0`` (``x = d * (q - 8)``), 4-bit asymmetric ->
  ``Q4_1`` (``x = d * q + m``, ``m = -d * z``), 5-bit symmetric -> ``Q5_0``
  (``x = d * (q - 16)``, llama.cpp's fallback for rows 256 does not divide), 8-bit symmetric ->
  ``Q8_0`` (``x = d * (q - 128)``, stored as int8);
- ``nvfp4``, ``fp8``, ``fp8_block`` and every other integer grid: refused.

Every tensor written is read back with ``gguf.quants.dequantize`` and compared with our grid:
K-quant and MXFP4 blocks must decode to the grid's values bit for bit (else the export is
refused). The legacy blocks' ``d`` and ``m`` are fp16, so a weight is exact when its
scale is fp16-representable and otherwise within fp16 rounding of the scale (the manifest
reports the largest difference, a NaN or inf difference refuses the export). A scale (or ``m``)
that fp16 turns into inf or, nonzero, into 0 is refused before writing, naming the layer.
Unquantized tensors are written in
float32 (pruned zeros stay exact). Models: the llama architecture (Llama, SmolLM2), with the
query/key row permutation llama.cpp's converter applies; the tokenizer is copied from the GGUF
file the model was loaded from when there is one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ppq_lightning.compressed.accounting import counted_layers
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.compressed.state import compressed_modules, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export.architecture import edited_layers, unwrap
from ppq_lightning.export.dtypes import check_fits
from ppq_lightning.export.grid_kinds import FLOAT, INT, KQUANT, grid_kind
from ppq_lightning.modules.targets import untaken_layers
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.float_formats import e8m0_code
from ppq_lightning.ops.kquants import pack_kquant
from ppq_lightning.ops.quant_grid import QuantGrid

FILE = "model.gguf"
GROUP = 32
# (bits, centred) of an integer grid in groups of 32 -> GGML block type name
BLOCK_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (8, True): "Q8_0"}
EXACT_TYPES = ("Q4_K", "Q5_K", "Q6_K", "MXFP4")  # decoded bit for bit, or refused
ARCHITECTURES = ("llama",)
MAPPABLE = (
    "K-quant grids (Q4_K, Q5_K, Q6_K), mxfp4 (MXFP4), and integer grids in groups of 32: 4-bit "
    "symmetric (Q4_0), 4-bit asymmetric (Q4_1), 5-bit symmetric (Q5_0) or 8-bit symmetric (Q8_0)"
)
_FLOAT_REFUSALS = {
    "nvfp4": "GGUF's NVFP4 block (gguf 0.19: 4 unsigned E4M3 scales per 64 weights) has no "
    "per-tensor global scale, and an nvfp4 weight's scale is an E4M3 value divided by one",
    "fp8": "GGUF has no FP8 (E4M3) block type",
    "fp8_block": "GGUF has no FP8 (E4M3) block type",
}
# the file type (general.file_type) of the block types a file holds
_K_MIXTURES = (
    ("Q4_K", {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, "MOSTLY_Q4_K_M"),
    ("Q5_K", {"Q5_K", "Q6_K", "Q5_1", "Q8_0"}, "MOSTLY_Q5_K_M"),
)
_SINGLE = {
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q8_0": "MOSTLY_Q8_0",
    "Q6_K": "MOSTLY_Q6_K",
    "MXFP4": "MOSTLY_MXFP4_MOE",
}


def block_type(state: Any) -> str:
    """The GGML block type of a layer's recorded grid, decided by the grid's kind first.

    Raises:
        PPQConfigError: for a grid no GGML block type represents (nvfp4, fp8, fp8_block; an
            integer grid of another width, symmetry or group size), saying which grids map.
    """
    kind = grid_kind(state.grid_format)
    if kind == KQUANT:
        return state.grid_format
    if kind == FLOAT:
        if state.grid_format == "mxfp4":
            return "MXFP4"
        raise PPQConfigError(
            f"grid_format={state.grid_format!r} has no GGUF block type: "
            f"{_FLOAT_REFUSALS[state.grid_format]}. GGUF export maps {MAPPABLE}; use "
            "format='compressed-tensors' or 'ppq'."
        )
    symmetric = state.grid.centred
    name = BLOCK_TYPES.get((state.bits, symmetric))
    if name is None or state.group_size != GROUP:
        raise PPQConfigError(
            f"a {state.bits}-bit {'symmetric' if symmetric else 'asymmetric'} grid with "
            f"group_size={state.group_size} has no GGUF block type: GGUF export maps {MAPPABLE}."
        )
    return name


def file_type(types: dict[str, int]) -> str:
    """The ``general.file_type`` (a ``gguf.LlamaFileType`` name) of a file whose quantized
    tensors have the block types ``types`` (name -> count), as llama.cpp names its mixtures:
    ``MOSTLY_Q4_K_M`` for Q4_K with Q6_K (and the Q5_0/Q8_0 fallbacks), ``MOSTLY_Q5_K_M``
    likewise, ``MOSTLY_<type>`` for one type, else that of the most frequent type."""
    present = set(types)
    for main, allowed, name in _K_MIXTURES:
        if main in present and present <= allowed:
            return name
    if len(present) == 1 and next(iter(present)) in _SINGLE:
        return _SINGLE[next(iter(present))]
    for kind, _ in sorted(types.items(), key=lambda item: -item[1]):
        if kind in _SINGLE:
            return _SINGLE[kind]
        if kind in ("Q4_K", "Q5_K"):
            return f"MOSTLY_{kind}_M"
    return "ALL_F32"


def check(model: nn.Module) -> None:
    """Refuse, before writing, a model or grid that GGUF export cannot represent.

    Raises:
        PPQConfigError: naming the layer or architecture.
    """
    network = unwrap(model)
    model_type = getattr(getattr(network, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PPQConfigError(
            f"format='gguf' exports the architectures {list(ARCHITECTURES)}, not "
            f"{model_type or type(network).__name__}; use format='compressed-tensors' or 'ppq'."
        )
    edited = edited_layers(network)
    if edited:
        raise PPQConfigError(
            f"{edited[0]}: structural edits and unmerged adapters do not export to GGUF "
            "(it describes the original architecture); use format='ppq'."
        )
    for name, _, state in compressed_modules(network):
        if state.bits is not None:
            try:
                kind = block_type(state)
            except PPQConfigError as err:
                raise PPQConfigError(f"{name}: {err}") from None
            if grid_kind(state.grid_format) == INT:
                _check_scales(name, state.grid, kind)
    check_invariants(network)


def _check_scales(name: str, grid: QuantGrid, kind: str) -> None:
    """Refuse a grid whose fp16 ``d`` (and, for Q4_1, ``m = -d * z``) would be inf or 0.

    Raises:
        PPQConfigError: naming the layer and the value (``dtypes.check_fits``).
    """
    where = f"GGUF's fp16 block scale d ({kind})"
    check_fits(name, "scale", grid.scale, torch.float16, where)
    if kind == "Q4_1":
        check_fits(name, "minimum m = -scale * zero", -grid.scale * grid.zero, torch.float16, where)


def _permute_rows(matrix: Tensor, heads: int) -> Tensor:
    """llama.cpp's row order of a query/key projection (rotary halves interleaved)."""
    rows = matrix.shape[0]
    return (
        matrix.reshape(heads, 2, rows // heads // 2, *matrix.shape[1:])
        .swapaxes(1, 2)
        .reshape(matrix.shape)
    )


def _blocks(codes: Tensor, grid: Any, kind: str) -> np.ndarray:
    """GGML blocks (uint8, one row of blocks per weight row) of ``codes`` (rows, cols) on
    ``grid``: K-quant super-blocks, MXFP4 or a legacy block of 32."""
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return pack_kquant(grid, codes)
    rows, cols = codes.shape
    q = codes.to(torch.int64).reshape(rows, cols // GROUP, GROUP)
    if kind == "MXFP4":  # byte 0: E8M0 exponent; byte 1 + j: code j | code j + 16 << 4
        e = e8m0_code(grid.scale).clamp(0, 255).to(torch.uint8).reshape(rows, -1, 1)
        nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        return torch.cat([e, nibbles], dim=2).reshape(rows, -1).numpy()
    scale, zero = grid.scale, grid.zero  # an integer grid
    d = scale.to(torch.float16).reshape(rows, -1, 1).view(torch.uint8)  # (rows, groups, 2)
    if kind == "Q5_0":  # d, 4 bytes of fifth bits (bit j: code j), 16 bytes of nibbles
        high = ((q >> 4) & 1) << torch.arange(GROUP)
        qh = high.sum(dim=2, keepdim=True).view(torch.uint8)[..., :4]  # uint32, little-endian
        nibbles = ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).to(torch.uint8)
        parts = [d, qh, nibbles]
    elif kind == "Q8_0":
        payload = (q - 128).to(torch.int8).view(torch.uint8)
        parts = [d, payload]
    else:
        nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        parts = [d, nibbles]
        if kind == "Q4_1":
            m = (-scale * zero).to(torch.float16).reshape(rows, -1, 1).view(torch.uint8)
            parts = [d, m, nibbles]
    return torch.cat(parts, dim=2).reshape(rows, -1).numpy()


def _source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file the model was loaded from (its tokenizer is copied), if any."""
    from ppq_lightning.models.loading import OFFLINE_DEFAULT, is_gguf_file, smollm2_gguf_path

    hparams = getattr(model, "hparams", {})
    name = hparams.get("model")
    if name == OFFLINE_DEFAULT and hparams.get("model_config") is None:
        return smollm2_gguf_path()
    return Path(name) if isinstance(name, str) and is_gguf_file(name) else None


def _write_metadata(writer: Any, config: Any, source: Path | None) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    for key, field in GGUF_CONFIG_MAPPING["llama"].items():
        value = getattr(config, field, None)
        if field == "rope_theta" and value is None:
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        if value is None:
            continue
        full = f"llama.{key}"
        if isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, int(value))
    if source is None:
        return
    import gguf

    reader = gguf.GGUFReader(str(source))
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            value = field.contents()
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, value)
            elif kind == gguf.GGUFValueType.STRING:
                writer.add_string(field.name, value)
            else:
                writer.add_key_value(field.name, value, kind)


def save(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write ``model`` (checked by :func:`check`) as ``folder/model.gguf``."""
    import gguf

    network = unwrap(model)
    config = network.config
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    writer = gguf.GGUFWriter(str(folder / FILE), "llama")
    _write_metadata(writer, config, _source_gguf(model))
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    layer_bytes, types, max_error = 0, {}, 0.0
    counted = {name for name, _, state in compressed_modules(network) if state.bits is not None}
    counted_all = set(counted_layers(network)) | set(untaken_layers(network))  # C counts both
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in network.state_dict().items():
        if not isinstance(tensor, Tensor) or ".ppq_state." in key:
            continue
        if tied and key == "lm_head.weight":
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PPQConfigError(f"{key}: no GGUF tensor name for it in the llama architecture.")
        layer = key.rsplit(".", 1)[0]
        module = network.get_submodule(layer) if key.endswith("weight") else None
        short = layer.rsplit(".", 1)[-1]
        if layer in counted and key.endswith("weight"):
            grid = get_state(module).grid.to("cpu")
            kind = block_type(get_state(module))
            codes = grid.codes(weight_matrix(module).detach().cpu())
            if short in heads:  # llama.cpp's row order: the grid's rows move with the codes
                order = _permute_rows(torch.arange(codes.shape[0]), heads[short])
                codes, grid = codes[order], grid.select_rows(order)
            try:
                data = _blocks(codes, grid, kind)
            except PPQConfigError as err:
                raise PPQConfigError(f"{key}: {err}") from None
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype))
            error = float((decoded - grid.dequantize(codes)).abs().max()) if codes.numel() else 0.0
            if not math.isfinite(error) or (kind in EXACT_TYPES and error != 0):
                # max(0.0, nan) is 0.0: a NaN must not pass as exact
                why = (
                    "inf or NaN" if not math.isfinite(error) else f"{kind} must decode bit for bit"
                )
                raise PPQConfigError(
                    f"{key}: gguf's dequantizer reads {kind} blocks that differ from the grid by "
                    f"{error} ({why}); nothing was written."
                )
            max_error = max(max_error, error)
            layer_bytes += data.nbytes if layer in counted_all else 0
            types[kind] = types.get(kind, 0) + 1
        else:
            value = tensor.detach().float().cpu()
            if short in heads and key.endswith("weight"):
                value = _permute_rows(value, heads[short])
            writer.add_tensor(gguf_name, value.numpy())
            if layer in counted_all and key.endswith("weight"):
                layer_bytes += value.numel() * 4
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type(types)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "layer_bytes": layer_bytes,
        "block_types": types,
        "file_type": file_type(types),
        "max_abs_error_vs_grid": max_error,
    }
