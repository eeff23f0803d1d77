"""compressed-tensors export (what transformers and vLLM read), and :func:`load_pretrained`.

Written with the ``compressed-tensors`` library (no llm-compressor): every quantized layer gets
a weight-only scheme, one config group per distinct scheme with the exact layer names as
targets (upstream, group order decides overlaps; ours never overlap). By grid kind:

- integer grids: ``pack-quantized`` (``int``, 2/4/8 bits, ``channel`` or ``group``, symmetric or
  asymmetric). Our codes ``q`` in ``[0, 2**b)`` with integer zero ``z`` become
  compressed-tensors' signed codes ``q - 2**(b-1)`` and, asymmetric, signed zero points
  ``z - 2**(b-1)``: ``(q - z) * scale`` is unchanged;
- ``nvfp4``: ``nvfp4-pack-quantized`` (``float``, 4 bits, ``tensor_group``, group 16): E4M3
  ``weight_scale`` and the float32 ``weight_global_scale`` (a weight's scale is
  ``weight_scale / weight_global_scale``, as ours);
- ``mxfp4``: ``mxfp4-pack-quantized`` (group 32, E8M0 ``weight_scale`` bytes);
- ``fp8`` / ``fp8_block``: ``float-quantized`` (``float``, 8 bits, ``channel`` / ``block``
  ``[128, 128]``), float32 ``weight_scale`` whatever ``dtype`` the export has;
- K-quant grids: refused (no compressed-tensors format holds them; GGUF does).

A model may mix them; the config's format is then ``mixed-precision`` and each group names its
own. compressed-tensors' compressors compute the codes from the weights on the grid and the
recorded scales, which gives our codes back (a grid value divided by its scale is the element
value up to float32 rounding, far from a tie).

Facts of the upstream releases this module handles (docs/export.md says more):

- asymmetric grids do not load through transformers' default path (zero points do not get
  their packed shape in the meta-device branch of the packed compressor): :func:`load_pretrained`
  builds the model on real tensors and decompresses it; symmetric grids load either way;
- ``CompressedTensorsConfig(dequantize=True)`` applies the first scheme to every layer, so a
  mixed-precision export loads through :func:`load_pretrained` or the default path (symmetric);
- odd widths (3, 5, 6, 7 bits) changed packing layout between releases: refused;
- the sparsity formats (``sparse-24-bitmask``, ``marlin-24``) were removed upstream and vLLM
  raises on them: pruned weights are exact zeros in the packed codes, and the masks (with the
  grids and histories) go to the side file ``ppq_state.safetensors`` that
  :func:`load_pretrained` reads back; no ``sparsity_config`` is written.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.accounting import counted_layers
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.compressed.state import (
    GRID_BUFFERS,
    STATE_NAME,
    compressed_modules,
    ensure_state,
)
from ppq_lightning.errors import PPQConfigError, check_choice
from ppq_lightning.export.architecture import describe, edited_layers, floating_dtype, unwrap
from ppq_lightning.export.dtypes import check_fits, check_range
from ppq_lightning.export.folder import counted_bytes, open_safetensors, verified_folder
from ppq_lightning.export.grid_kinds import INT, KQUANT, grid_kind
from ppq_lightning.modules.attention import attention_of
from ppq_lightning.modules.targets import untaken_layers
from ppq_lightning.modules.tree import find_module
from ppq_lightning.modules.views import as_matrix, to_weight_layout
from ppq_lightning.ops.float_grid import FloatGrid
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.quant_grid import QuantGrid

CT_BITS = (2, 4, 8)
VLLM_ZERO_POINT_BITS = (4, 8)
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
SIDE_FILE = "ppq_state.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED_PARTS = (
    "weight",
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_global_scale",
)
# a floating-point grid's compressed-tensors format, and its weight arguments (besides
# num_bits, type="float", symmetric=True, dynamic=False)
FLOAT_SCHEMES = {
    "nvfp4": ("nvfp4-pack-quantized", {"strategy": "tensor_group", "group_size": 16}),
    "mxfp4": ("mxfp4-pack-quantized", {"strategy": "group", "group_size": 32}),
    "fp8": ("float-quantized", {"strategy": "channel"}),
    "fp8_block": ("float-quantized", {"strategy": "block", "block_structure": [128, 128]}),
}


def _export_dtype(network: nn.Module, dtype: str | None) -> torch.dtype:
    if dtype is None:
        return floating_dtype(network)
    return DTYPES[check_choice("dtype", dtype, DTYPES)]


def check(model: nn.Module, dtype: str | None = None) -> None:
    """Refuse what compressed-tensors cannot represent, before anything is written; warn about
    what vLLM's kernels will not run.

    Raises:
        PPQConfigError: for a model that is not a transformers model, structural edits or
            unmerged adapters, a compressed projection of an ``nn.MultiheadAttention``, a
            K-quant grid, an integer width outside 2/4/8, weights off their recorded grids, or a
            scale or weight the export
            dtype cannot hold (a scale it turns into inf or, nonzero, into 0; a weight above
            its largest value), naming the layer and the value.
    """
    network = unwrap(model)
    export_dtype = _export_dtype(network, dtype)
    if describe(model)["kind"] != "transformers":
        raise PPQConfigError(
            f"format='compressed-tensors' exports transformers models, not "
            f"{type(network).__name__}; use format='ppq' for other models."
        )
    edited = edited_layers(network)
    if edited:
        raise PPQConfigError(
            f"format='compressed-tensors' describes the original architecture, but {edited[:3]} "
            "carry structural edits or unmerged LoRA adapters (removed blocks or channels, shared "
            "bases, adapters): merge adapters (LoRAFineTune(merge='at_end')) or use format='ppq' "
            "(structural edits) / format='peft' (adapters)."
        )
    for name, module, state in compressed_modules(network):
        if attention_of(module) is not None:
            raise PPQConfigError(
                f"{name}: format='compressed-tensors' cannot hold a compressed projection of an "
                "nn.MultiheadAttention: its q_proj/k_proj/v_proj are rows of in_proj_weight "
                "(views ppq-lightning installs, no layer of the model transformers builds), and "
                "torch's attention reads out_proj.weight as a tensor, which compressed-tensors "
                "replaces by packed codes. Use format='ppq', or leave the attention out "
                "(`ignore`)."
            )
        if state.bits is not None and not isinstance(module, nn.Linear):
            raise PPQConfigError(
                f"{name}: compressed-tensors quantizes nn.Linear layers, not "
                f"{type(module).__name__} (GPT-2's Conv1D stores its weight transposed); use "
                "format='ppq' for this model."
            )
        kind = grid_kind(state.grid_format) if state.bits is not None else None
        if kind == KQUANT:
            raise PPQConfigError(
                f"{name}: grid_format={state.grid_format!r} (a GGUF K-quant) has no "
                "compressed-tensors format: it exports integer grids, nvfp4, mxfp4, fp8 and "
                "fp8_block; use format='gguf' (llama.cpp) or format='ppq'."
            )
        if kind == INT and state.bits not in CT_BITS:
            raise PPQConfigError(
                f"{name}: bits={state.bits} is not exported to compressed-tensors: allowed "
                f"{list(CT_BITS)} (odd widths changed packing layout between compressed-tensors "
                "releases); use format='ppq', which packs any width."
            )
    check_invariants(network)
    _check_dtype_holds(network, export_dtype)
    _warn_vllm_limits(network)


def _check_dtype_holds(network: nn.Module, dtype: torch.dtype) -> None:
    """Refuse scales and weights that ``dtype`` turns into inf (or, scales, into 0)."""
    where = f"compressed-tensors with dtype={str(dtype).removeprefix('torch.')!r}"
    for name, _, state in compressed_modules(network):
        if state.bits is not None and state.grid_format == INT:  # FP grids keep their scales
            check_fits(name, "scale", state.grid.scale, dtype, where)
    for key, tensor in network.state_dict().items():
        if isinstance(tensor, Tensor) and STATE_NAME not in key.split("."):
            check_range(key, tensor, dtype, where)


def _warn_vllm_limits(network: nn.Module) -> None:
    """One warning per limit of vLLM's kernels that some layers exceed, naming them."""
    limits: dict[str, list[str]] = {}
    for name, module, state in compressed_modules(network):
        if state.bits is None or state.grid_format != INT:  # the int kernels' limits
            continue
        rows, cols = as_matrix(module, module.weight).shape
        group = state.group_size if state.group_size is not None else -1
        if not state.grid.centred and state.bits not in VLLM_ZERO_POINT_BITS:
            limits.setdefault(f"zero points at {state.bits} bits (vLLM: 4 and 8)", []).append(name)
        if group not in VLLM_GROUP_SIZES:
            limits.setdefault(f"group size {group} (Marlin: {VLLM_GROUP_SIZES})", []).append(name)
        if cols % 128 or rows % 64:
            limits.setdefault("shapes (Marlin: out % 64 == 0, in % 128 == 0)", []).append(name)
    for limit, names in limits.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        warnings.warn(
            f"vLLM's Marlin kernels do not take {len(names)} layer(s), {limit}: "
            f"{', '.join(names[:3])}{more} (vLLM falls back to a slower kernel or refuses).",
            stacklevel=4,
        )


def _rounded_grid(state: Any, dtype: torch.dtype) -> Grid:
    """The recorded grid, an integer grid's scales rounded to the export dtype (kept float32);
    a floating-point grid as recorded (its scales are stored exactly)."""
    grid = state.grid
    if not isinstance(grid, QuantGrid):
        return grid
    scale = grid.scale.to(dtype).to(torch.float32)
    return QuantGrid(scale, grid.zero, grid.bits, grid.group_size, grid.symmetric)


SchemeKey = tuple[Any, ...]


def _schemes(network: nn.Module) -> dict[SchemeKey, list[str]]:
    """Quantized layers grouped by scheme, in model order: ``(bits, group size, symmetric)``
    for integer grids, ``(format,)`` for floating-point ones."""
    groups: dict[SchemeKey, list[str]] = {}
    for name, _, state in compressed_modules(network):
        if state.bits is not None:
            key: SchemeKey = (state.grid_format,)
            if state.grid_format == INT:
                key = (state.bits, state.group_size, state.grid.centred)
            groups.setdefault(key, []).append(name)
    return groups


def _scheme(key: SchemeKey, names: list[str]) -> Any:
    """compressed-tensors' ``QuantizationScheme`` of a :func:`_schemes` group (weights only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if len(key) == 1:
        format, arguments = FLOAT_SCHEMES[key[0]]
        bits = 8 if key[0].startswith("fp8") else 4
        if key[0] == "nvfp4":
            arguments = {**arguments, "scale_dtype": torch.float8_e4m3fn}
        elif key[0] == "mxfp4":
            arguments = {**arguments, "scale_dtype": torch.uint8}
        else:
            arguments = {**arguments, "scale_dtype": torch.float32}
        weights = QuantizationArgs(
            num_bits=bits, type="float", symmetric=True, dynamic=False, **arguments
        )
        return QuantizationScheme(targets=names, weights=weights, format=format)
    bits, group, symmetric = key
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="channel" if group is None else "group",
        group_size=group,
    )
    return QuantizationScheme(targets=names, weights=weights, format="pack-quantized")


def _side_file(network: nn.Module, folder: Path, grids: dict[str, Grid]) -> None:
    """Masks, export grids and histories of every compressed layer, for ppq to read back."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    records: dict[str, Any] = {}
    for name, _, state in compressed_modules(network):
        records[name] = state.get_extra_state()
        if state.mask_bits is not None:
            tensors[f"{name}.mask_bits"] = state.mask_bits.cpu()
        grid = grids.get(name)
        if isinstance(grid, QuantGrid):
            tensors[f"{name}.scale"] = grid.scale.cpu()
            tensors[f"{name}.zero"] = grid.zero.cpu()
        elif isinstance(grid, FloatGrid):
            tensors[f"{name}.scale"] = grid.scale.cpu()
            if grid.global_scale is not None:
                tensors[f"{name}.global_scale"] = grid.global_scale.cpu()
    save_file(tensors, str(folder / SIDE_FILE), metadata={"ppq_state": json.dumps(records)})


def _forget_gguf_origin(network: nn.Module) -> None:
    """A model transformers dequantized from a GGUF file keeps a (non-serializable) GGUF
    quantizer; its weights are plain floats, which the export replaces anyway."""
    quantizer = getattr(network, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        network.hf_quantizer = None
        network.is_quantized = False
        if hasattr(network.config, "quantization_config"):
            del network.config.quantization_config


def save(model: nn.Module, folder: Path, dtype: str | None = None) -> dict[str, Any]:
    """Write ``model`` (checked by :func:`check`) as a compressed-tensors folder."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    network = unwrap(model)
    export_dtype = _export_dtype(network, dtype)
    grids = {
        name: _rounded_grid(state, export_dtype)
        for name, _, state in compressed_modules(network)
        if state.bits is not None
    }
    copied = copy.deepcopy(network).to(export_dtype)
    _forget_gguf_origin(copied)
    for name, module, _ in list(compressed_modules(copied)):
        delattr(module, STATE_NAME)
        if name not in grids:
            continue
        grid = grids[name].to(module.weight.device)
        codes = grid.quantize(as_matrix(module, network.get_submodule(name).weight.detach()))
        with torch.no_grad():  # on the rounded grid, exactly (see the module docstring)
            module.weight.copy_(to_weight_layout(module, grid.dequantize(codes)))
        if not bool(torch.isfinite(module.weight).all()):  # check() bounds it; never write inf
            raise PPQConfigError(
                f"{name}: its weights on the grid rounded to {export_dtype} are not finite in "
                f"{export_dtype}; nothing was written. Use dtype='float32' or format='ppq'."
            )
        if isinstance(grid, FloatGrid):  # scales kept exact: float32 (E4M3, E8M0 values)
            module.weight_scale = nn.Parameter(grid.scale.clone(), requires_grad=False)
            if grid.global_scale is not None:
                global_scale = grid.global_scale.clone()
                module.weight_global_scale = nn.Parameter(global_scale, requires_grad=False)
            continue
        module.weight_scale = nn.Parameter(grid.scale.to(export_dtype), requires_grad=False)
        if not grid.centred:
            zero = (grid.zero - 2 ** (grid.bits - 1)).to(torch.int8)
            module.weight_zero_point = nn.Parameter(zero, requires_grad=False)
    schemes = _schemes(network)
    for key, names in schemes.items():
        scheme = _scheme(key, names)
        for name in names:
            module = copied.get_submodule(name)
            module.quantization_scheme = scheme
            module.quantization_status = QuantizationStatus.FROZEN
    only_int = all(len(key) == 3 for key in schemes)  # else each group names its format
    compressor = ModelCompressor.from_pretrained_model(
        copied, quantization_format="pack-quantized" if only_int else None
    )
    compressor.compress_model(copied)
    copied.config.dtype = export_dtype
    copied.save_pretrained(str(folder))
    compressor.update_config(str(folder))
    _side_file(network, folder, grids)
    stored = copied.state_dict()  # the compressed tensors save_pretrained wrote
    return {
        "layer_bytes": counted_bytes(
            stored, list(counted_layers(network)), STORED_PARTS, list(untaken_layers(network))
        ),
        "dtype": str(export_dtype).removeprefix("torch."),
        "schemes": [
            {"format": key[0], "layers": len(n)}
            if len(key) == 1
            else {"bits": key[0], "group_size": key[1], "symmetric": key[2], "layers": len(n)}
            for key, n in schemes.items()
        ],
    }


def load_pretrained(path: str | Path, dtype: str = "float32") -> nn.Module:
    """Load a compressed-tensors export (ours or any ``pack-quantized`` folder) as a dense
    transformers model, also where transformers' default path fails (asymmetric grids), and
    give it back its ppq masks, grids and histories when the side file is there.

    Args:
        path: the export folder (``config.json`` with a ``quantization_config``).
        dtype: ``float32``, ``float16`` or ``bfloat16``.

    Returns:
        The decompressed causal LM, eval mode; with ``ppq_state.safetensors`` its compressed
        layers carry their states (``check_invariants`` holds).

    Raises:
        PPQConfigError: on a folder without a compressed-tensors config, a truncated file, a
            file whose sha256 differs from the one the export's ``export.json`` records, or
            weights that do not fit the config.

    Example::

        from ppq_lightning.export import load_pretrained
        model = load_pretrained("exports/smollm2_gptq4_asym")
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    torch_dtype = DTYPES[check_choice("dtype", dtype, DTYPES)]
    verified_folder(folder)  # a killed overwrite recovered; export.json's sha256 checked
    if not (folder / "config.json").is_file():
        raise PPQConfigError(f"path={str(folder)!r} holds no config.json: not an HF export.")
    config = AutoConfig.from_pretrained(str(folder))
    raw = getattr(config, "quantization_config", None)
    if raw is None:  # nothing quantized (a pruned model): plain weights, exact zeros
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
        _restore_states(model, folder / SIDE_FILE)
        return model.eval()
    raw = raw if isinstance(raw, dict) else raw.to_dict()
    del config.quantization_config
    fields = QuantizationConfig.model_fields
    quantization = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in fields})
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    apply_quantization_config(model, quantization)
    compressor = ModelCompressor(quantization_config=quantization)
    compressor.compress_model(model)  # real tensors: packed shapes of weights and zero points
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise PPQConfigError(f"{folder} holds no model*.safetensors file.")
    state_dict: dict[str, Tensor] = {}
    for file in files:
        with open_safetensors(file) as handle:
            state_dict.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise PPQConfigError(
            f"the weights in {folder} do not fit its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}."
        )
    if tied:
        model.tie_weights()
    compressor.decompress_model(model)
    _fp4_in_float32(model, state_dict, torch_dtype)
    _restore_states(model, folder / SIDE_FILE)
    return model.eval()


def _fp4_in_float32(model: nn.Module, state_dict: dict[str, Tensor], dtype: torch.dtype) -> None:
    """Decode NVFP4/MXFP4 weights again in float32: compressed-tensors' FP4 decompressor
    unpacks to bfloat16 and computes the weights in it (0.20.1), so a float32 model would get
    bf16 weights. Each weight is the E2M1 value times its scale (``weight_scale /
    weight_global_scale`` for NVFP4, ``2**(e - 127)`` for MXFP4), in float32 as the grid
    computes it, then cast once to ``dtype``."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        packed = state_dict.get(f"{name}.weight_packed")
        if args is None or packed is None or str(args.type) not in ("float", "FLOAT"):
            continue
        if args.num_bits != 4 or args.group_size not in (16, 32):
            continue
        rows, half = packed.shape
        values = unpack_fp4_from_uint8(packed, rows, 2 * half, dtype=torch.float32)
        scale = state_dict[f"{name}.weight_scale"]
        global_scale = state_dict.get(f"{name}.weight_global_scale")
        if global_scale is not None:  # NVFP4: E4M3 scales over a float32 global scale
            scale = scale.to(torch.float32) / global_scale.to(torch.float32)
        else:  # MXFP4: E8M0 exponents, 2**(e - 127) exactly
            scale = decompress_mx_scale(scale).to(torch.float32)
        weight = values * scale.repeat_interleave(args.group_size, dim=1)
        del module.weight  # compressed-tensors may hold it offloaded: replace it whole
        module.weight = nn.Parameter(weight.to(dtype), requires_grad=False)


def _restore_states(model: nn.Module, side_file: Path) -> None:
    """Attach the masks, grids and histories of the side file to the loaded layers."""
    if not side_file.is_file():
        return
    with open_safetensors(side_file) as handle:
        records = json.loads((handle.metadata() or {}).get("ppq_state", "{}"))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for name, extra in records.items():
        module = find_module(model, name)
        if module is None:
            raise PPQConfigError(f"{side_file} records layer {name!r}, which the model lacks.")
        state = ensure_state(module)
        buffers = {b: tensors.get(f"{name}.{b}") for b in ("mask_bits", *GRID_BUFFERS)}
        state.load_state_dict(
            {b: t for b, t in buffers.items() if t is not None} | {"_extra_state": extra},
            strict=False,
        )
        for b, t in buffers.items():
            if t is None:
                setattr(state, b, None)
    check_invariants(model)
