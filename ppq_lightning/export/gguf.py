"""GGUF export for llama.cpp, written with the ``gguf`` package's writer.

Grids map onto GGML block types only where the block's arithmetic is the grid's:

- 4-bit symmetric, groups of 32 -> ``Q4_0`` (``x = d * (q - 8)``);
- 4-bit asymmetric, groups of 32 -> ``Q4_1`` (``x = d * q + m``, ``m = -d * z``);
- 8-bit symmetric, groups of 32 -> ``Q8_0`` (``x = d * (q - 128)``, stored as int8).

The codes are ours, never re-quantized; ``d`` and ``m`` are fp16, so a weight is exact when its
scale is fp16-representable and otherwise within fp16 rounding of the scale (the manifest
reports the largest difference, a NaN or inf difference refuses the export). A scale (or ``m``)
that fp16 turns into inf or, nonzero, into 0 is refused before writing, naming the layer. Any
other grid is refused. Unquantized tensors are written in
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
from ppq_lightning.modules.targets import untaken_layers
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.quant_grid import QuantGrid

FILE = "model.gguf"
GROUP = 32
# (bits, symmetric) -> GGML block type name
BLOCK_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
ARCHITECTURES = ("llama",)
MAPPABLE = (
    "4-bit symmetric (Q4_0), 4-bit asymmetric (Q4_1) or 8-bit symmetric (Q8_0) in groups of 32"
)


def block_type(state: Any) -> str:
    """The GGML block type of a layer's recorded grid.

    Raises:
        PPQConfigError: for a grid no GGML block type represents.
    """
    symmetric = state.grid.centred
    name = BLOCK_TYPES.get((state.bits, symmetric))
    if name is None or state.group_size != GROUP:
        raise PPQConfigError(
            f"a {state.bits}-bit {'symmetric' if symmetric else 'asymmetric'} grid with "
            f"group_size={state.group_size} has no GGUF block type: GGUF export maps {MAPPABLE}."
        )
    return name


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


def _blocks(codes: Tensor, scale: Tensor, zero: Tensor, kind: str) -> np.ndarray:
    """GGML blocks (uint8, one row of blocks per weight row) of codes on a group-32 grid."""
    rows, cols = codes.shape
    q = codes.to(torch.int64).reshape(rows, cols // GROUP, GROUP)
    d = scale.to(torch.float16).reshape(rows, -1, 1).view(torch.uint8)  # (rows, groups, 2)
    if kind == "Q8_0":
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
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
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
            state = get_state(module)
            grid = state.grid
            kind = block_type(state)
            codes = grid.quantize(weight_matrix(module).detach().float().cpu())
            scale, zero = grid.scale.cpu(), grid.zero.cpu()
            if short in heads:
                codes, scale, zero = (_permute_rows(t, heads[short]) for t in (codes, scale, zero))
            data = _blocks(codes, scale, zero, kind)
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype))
            exact = QuantGrid(scale, zero, grid.bits, grid.group_size, grid.symmetric).dequantize(
                codes
            )
            error = float((decoded - exact).abs().max()) if exact.numel() else 0.0
            if not math.isfinite(error):  # max(0.0, nan) is 0.0: a NaN must not pass as exact
                raise PPQConfigError(
                    f"{key}: gguf's dequantizer reads {kind} blocks that differ from the grid by "
                    f"{error} (inf or NaN); nothing was written."
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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"layer_bytes": layer_bytes, "block_types": types, "max_abs_error_vs_grid": max_error}
