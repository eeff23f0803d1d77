"""The native packed format (``format="ppq"``): one safetensors file that rebuilds the compressed
model bit for bit, with its masks, grids, history and structural edits.

``model.safetensors`` holds the model's state dict (compression states included) with the
weights of compressed layers encoded:

- ``codes``: a weight on its recorded grid is stored as its integer codes packed at the grid's
  width (``ops.packing``; two per byte at 4 bits), only at the kept positions when the layer is
  pruned and that is smaller (as ``compressed.accounting`` counts it); the grid's zero points
  are packed codes too, its scales fp16 when fp16 holds them exactly (else float32);
- ``values``: a pruned, unquantized weight is stored as its kept values, when smaller;
- ``dense``: anything else, as is (also a weight that left its grid, e.g. after training
  without projection): never lossy.

An ``nn.MultiheadAttention``'s query, key and value projections are views of rows of its
``in_proj_weight`` (or of ``q_proj_weight``, ...; ``modules.attention``): the file stores that
parameter as its views' weights, ``...q_proj.weight``, ``...k_proj.weight`` and
``...v_proj.weight``, each encoded as above with its own state (a view without a state is
stored dense), and the metadata's ``views`` record says which rows each fills, so the stored
bytes of a compressed attention are what the measured C counts for its projections.

The masks are the states' own bit-packed buffers (one bit per weight; for 2:4 as small as
N:M indices). Non-tensor state (grid settings, histories, the structural edits they record)
and the architecture record go to the file's metadata as JSON, so loading executes no code: a
fresh model of the recorded architecture replays the edits (``edits.enable_state_loading``)
and loads the decoded state dict strictly.
"""

from __future__ import annotations

import itertools
import json
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
    get_state,
    grid_from_buffers,
)
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export.architecture import (
    build,
    check_skeleton,
    describe,
    floating_dtype,
    unwrap,
    wrap,
)
from ppq_lightning.export.folder import counted_bytes, open_safetensors, verified_folder
from ppq_lightning.export.grid_kinds import FLOAT, INT, grid_kind, zero_codes
from ppq_lightning.modules.attention import AttentionProjection
from ppq_lightning.modules.targets import untaken_layers
from ppq_lightning.modules.views import as_matrix, stores_transposed, to_weight_layout
from ppq_lightning.ops.float_formats import e4m3_code, e4m3_value, e8m0_code, e8m0_value
from ppq_lightning.ops.float_grid import SPECS
from ppq_lightning.ops.kquants import LAYOUTS, SUPER_BLOCK
from ppq_lightning.ops.masks import unpack_mask
from ppq_lightning.ops.packing import pack_codes, packed_size, unpack_codes
from ppq_lightning.ops.storage import sparse_is_smaller

FORMAT, VERSION = "ppq", 2
READS = (1, 2)  # version 1 stored an attention's in_proj_weight dense, as a plain tensor
WEIGHTS = "model.safetensors"
# what a compressed layer's weight costs in the file
STORED_PARTS = ("weight", *(f"{STATE_NAME}.{b}" for b in (*GRID_BUFFERS, "mask_bits")))
_GRID_KEYS = tuple(f"{STATE_NAME}.{b}" for b in GRID_BUFFERS)
# one-byte scales of the floating-point grids: (value -> byte, byte -> value)
_SCALE_BYTES = {"e4m3": (e4m3_code, e4m3_value), "e8m0": (e8m0_code, e8m0_value)}
_SCALE_ENCODING = {"nvfp4": "e4m3", "mxfp4": "e8m0"}
_KQUANT_WIDTHS = {"sc": 6, "m": 6}  # Q4_K/Q5_K sub-scales and mins (Q6_K's int8 sc: 8 bits)
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same bits (unlike ``torch.equal``, -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _encode_weight(module: nn.Module, state: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The stored tensors (by key suffix) and the decoding record of one compressed weight."""
    weight = module.weight.detach()
    layout = {"shape": list(weight.shape), "dtype": str(weight.dtype)}
    layout["transposed"] = stores_transposed(module)
    mask = state.mask
    grid = state.grid
    if grid is not None:
        codes = grid.to("cpu").codes(as_matrix(module, weight).cpu()).to(torch.int64)
        decoded = to_weight_layout(module, grid.dequantize(codes.float())).to(weight.dtype)
        if _bits_equal(decoded, weight.cpu()):
            sparse = mask is not None and _sparse_is_smaller(weight, grid.bits)
            zeros = zero_codes(grid.to("cpu"), codes.shape[1]) if sparse else None
            if zeros is not None:  # the code of 0: a zero point, 0 (FP grids), z (K-quants)
                matrix_mask = as_matrix(module, mask).cpu()
                sparse = torch.equal(codes[~matrix_mask], zeros[~matrix_mask])
                stored = codes[matrix_mask] if sparse else codes
            else:
                sparse, stored = False, codes
            record = {"encoding": "codes", "bits": grid.bits, "sparse": bool(sparse), **layout}
            return {"": pack_codes(stored, grid.bits)}, record
    elif mask is not None and _sparse_is_smaller(weight, 8 * weight.element_size()):
        zeros = weight[~mask]
        if _bits_equal(zeros, torch.zeros_like(zeros)):
            return {"": weight[mask].contiguous()}, {"encoding": "values", **layout}
    return {"": weight.contiguous()}, {"encoding": "dense", **layout}


def _sparse_is_smaller(weight: Tensor, bits: int) -> bool:
    """Whether nonzero values plus a bitmask beat the dense codes (``ops.storage``)."""
    return sparse_is_smaller(weight.numel(), int((weight != 0).sum()), bits)


def _buffer_width(key: str, extra: dict[str, Any]) -> int | None:
    """The bits of a grid buffer whose values are codes: an integer grid's zero points (its
    width), a K-quant's sub-scales and mins (6 bits; Q6_K's sub-scales 8); else None."""
    leaf = key.rsplit(".", 1)[-1]
    bits, grid_format = extra.get("bits"), extra.get("grid_format", INT)
    if leaf == "zero" and grid_format == INT and isinstance(bits, int):
        return bits
    if leaf in _KQUANT_WIDTHS and grid_format in LAYOUTS:
        return 8 if grid_format == "Q6_K" and leaf == "sc" else _KQUANT_WIDTHS[leaf]
    return None


def _are_codes(values: Tensor, bits: int) -> bool:
    """Whether ``values`` are integers in ``[0, 2**bits)`` (then packed as codes)."""
    if values.numel() and (float(values.min()) < 0 or float(values.max()) >= 2**bits):
        return False
    return _bits_equal(values.to(torch.int64).to(values.dtype), values)  # no -0.0 to lose


def _encode_grid_buffer(
    key: str, value: Tensor, state_dict: dict[str, Any]
) -> tuple[Tensor, dict[str, Any] | None]:
    """How a grid buffer is stored, and its record (None: as is): integers as packed codes
    (zero points, K-quant sub-scales and mins), NVFP4's E4M3 and MXFP4's E8M0 scales as their
    bytes, other scales (and K-quant ``d``/``dmin``) in fp16 where fp16 holds them exactly."""
    extra = state_dict.get(key.rsplit(".", 1)[0] + "._extra_state", {})
    leaf = key.rsplit(".", 1)[-1]
    layout = {"shape": list(value.shape), "dtype": str(value.dtype)}
    width = _buffer_width(key, extra)
    if width is not None and _are_codes(value, width):
        record = {"encoding": "codes", "bits": width, "sparse": False, "transposed": False}
        return pack_codes(value.to(torch.int64), width), {**record, **layout}
    encoding = _SCALE_ENCODING.get(extra.get("grid_format", INT)) if leaf == "scale" else None
    if encoding is not None:
        to_byte, to_value = _SCALE_BYTES[encoding]
        byte = to_byte(value.float()).clamp(0, 255).to(torch.uint8)
        if _bits_equal(to_value(byte).to(value.dtype), value):
            return byte, {"encoding": encoding, **layout}
    if leaf in ("scale", "d", "dmin") and _bits_equal(value.half().to(value.dtype), value):
        return value.half(), {"encoding": "fp16", "dtype": str(value.dtype)}
    return value, None


def _json_safe(key: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise PPQConfigError(
            f"state_dict entry {key!r} is not plain data ({err}); format='ppq' stores non-tensor "
            "state as JSON so that loading runs no code."
        ) from err
    return value


def encode(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the metadata record of ``model`` in the native format.

    Raises:
        PPQConfigError: when non-tensor state is not plain data.
    """
    network = unwrap(model)
    state_dict = model.state_dict()  # a LightningModule's own records (DepGraph) included
    encodings: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple, str] = {}
    weights: dict[str, tuple[nn.Module, Any]] = {}
    for name, module, state in compressed_modules(model):
        if isinstance(getattr(module, "weight", None), Tensor):
            weights[f"{name}.weight" if name else "weight"] = (module, state)
    views = _projection_views(model, state_dict)
    layouts: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            extra[key] = _json_safe(key, value)
            continue
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()))
        if value.numel() and identity in owners:  # tied or shared weights: stored once
            aliases[key] = owners[identity]
            continue
        owners[identity] = key
        if key in views:  # an attention's projections: each view's rows, as its own weight
            parts = []
            for view_key, (rows, module, state) in views[key].items():
                if state is None:
                    stored = {"": module.weight.detach().clone()}  # not the parameter's memory
                    record = {"encoding": "dense"}
                else:
                    stored, record = _encode_weight(module, state)
                encodings[view_key] = record
                tensors[view_key] = stored[""]
                parts.append([view_key, *rows])
            layouts[key] = {"shape": list(value.shape), "dtype": str(value.dtype), "parts": parts}
        elif key in weights:
            stored, record = _encode_weight(*weights[key])
            encodings[key] = record
            tensors[key] = stored[""]
        elif key.endswith(_GRID_KEYS):
            stored, record = _encode_grid_buffer(key, value, state_dict)
            if record is not None:
                encodings[key] = record
            tensors[key] = stored
        else:
            tensors[key] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": describe(model),
        "wrapper": type(model).__name__ if network is not model else None,
        "dtype": str(floating_dtype(network)),
        "encodings": encodings,
        "aliases": aliases,
        "extra_state": extra,
        "views": layouts,
    }
    return tensors, metadata


def _projection_views(
    model: nn.Module, state_dict: dict[str, Any]
) -> dict[str, dict[str, tuple[tuple[int, int], nn.Module, Any]]]:
    """``{parameter key: {view weight key: ((first row, end row), view, state or None)}}`` for
    every attention parameter whose rows the projection views of ``model`` cover entirely and
    of which at least one view carries a compression state."""
    names = {id(m): name for name, m in model.named_modules()}
    found: dict[str, dict[str, tuple[tuple[int, int], nn.Module, Any]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, AttentionProjection) or id(module.attention) not in names:
            continue
        owner = names[id(module.attention)]
        key = f"{owner}.{module.parameter_name}" if owner else module.parameter_name
        parameter = state_dict.get(key)
        if not isinstance(parameter, Tensor):
            continue
        weight = module.weight
        step = parameter.stride(0) * parameter.element_size() if parameter.dim() else 0
        offset = weight.data_ptr() - parameter.data_ptr()
        if not step or offset % step or weight.shape[1:] != parameter.shape[1:]:
            continue
        first = offset // step
        view_key = f"{name}.weight" if name else "weight"
        found.setdefault(key, {})[view_key] = (
            (first, first + weight.shape[0]),
            module,
            get_state(module),
        )
    complete = {}
    for key, parts in found.items():
        rows = sorted(r for r, _, _ in parts.values())
        covered = all(a[1] == b[0] for a, b in itertools.pairwise(rows))
        whole = rows[0][0] == 0 and rows[-1][1] == state_dict[key].shape[0] and covered
        if whole and any(state is not None for _, _, state in parts.values()):
            complete[key] = dict(sorted(parts.items(), key=lambda item: item[1][0]))
    return complete


def save(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write ``model`` as ``folder/model.safetensors``; return what the manifest adds."""
    from safetensors.torch import save_file

    tensors, metadata = encode(model)
    save_file(tensors, str(folder / WEIGHTS), metadata={FORMAT: json.dumps(metadata)})
    layers = list(counted_layers(model))
    weights = [r["encoding"] for k, r in metadata["encodings"].items() if k.endswith("weight")]
    return {
        "layer_bytes": counted_bytes(tensors, layers, STORED_PARTS, list(untaken_layers(model))),
        "weight_encodings": {kind: weights.count(kind) for kind in ("codes", "values", "dense")},
    }


def _decode(tensors: dict[str, Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """The state dict that ``encode`` stored."""
    state_dict: dict[str, Any] = dict(tensors)
    encodings = metadata["encodings"]
    for key, record in encodings.items():  # the grids' buffers first: weights need them
        if key.endswith(_GRID_KEYS):
            state_dict[key] = _decode_tensor(tensors[key], record)
    state_dict.update(metadata["extra_state"])
    for key, record in encodings.items():
        if not key.endswith(_GRID_KEYS):
            state_dict[key] = _decode_weight(key, tensors[key], record, state_dict)
    for key, layout in metadata.get("views", {}).items():  # an attention's rows, view by view
        parameter = torch.empty(layout["shape"], dtype=_DTYPES[layout["dtype"]])
        for view_key, first, end in layout["parts"]:
            parameter[first:end] = state_dict.pop(view_key)
        state_dict[key] = parameter
    for key, owner in metadata["aliases"].items():
        state_dict[key] = state_dict[owner]
    return state_dict


def _decode_tensor(stored: Tensor, record: dict[str, Any]) -> Tensor:
    dtype = _DTYPES[record["dtype"]]
    if record["encoding"] == "fp16":
        return stored.to(dtype)
    if record["encoding"] in _SCALE_BYTES:
        return _SCALE_BYTES[record["encoding"]][1](stored).to(dtype)
    numel = int(torch.Size(record["shape"]).numel())
    return unpack_codes(stored, record["bits"], numel).to(dtype).view(record["shape"])


def _decode_weight(key: str, stored: Tensor, record: dict[str, Any], state_dict: dict) -> Tensor:
    if record["encoding"] == "dense":
        return stored
    prefix = key[: -len("weight")] + STATE_NAME + "."
    extra = state_dict.get(prefix + "_extra_state", {})
    shape, dtype = torch.Size(record["shape"]), _DTYPES[record["dtype"]]
    mask = None
    if extra.get("mask_shape") is not None:
        mask = unpack_mask(state_dict[prefix + "mask_bits"], tuple(extra["mask_shape"]))
    if record["encoding"] == "values":
        weight = torch.zeros(shape, dtype=dtype)
        weight[mask] = stored
        return weight
    grid = grid_from_buffers({b: state_dict.get(prefix + b) for b in GRID_BUFFERS}, extra)
    rows_cols = (
        (shape[1], shape[0]) if record["transposed"] else (shape[0], shape.numel() // shape[0])
    )
    matrix_mask = None
    if mask is not None:
        matrix_mask = mask.t() if record["transposed"] else mask.reshape(rows_cols)
    if record["sparse"]:
        zeros = zero_codes(grid, rows_cols[1])
        if zeros is None:
            raise PPQConfigError(f"{key}: stored sparse on a grid without an exact 0.")
        codes = zeros.float()
        kept = unpack_codes(stored, record["bits"], int(matrix_mask.sum()))
        codes[matrix_mask] = kept.float()
    else:
        codes = unpack_codes(stored, record["bits"], shape.numel()).float().view(rows_cols)
    matrix = grid.dequantize(codes)
    weight = matrix.t() if record["transposed"] else matrix.reshape(shape)
    return weight.to(dtype).contiguous()


def read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The stored tensors and the metadata of a native export (a folder or its file), its
    checksums verified (``export.json``), its declared sizes checked against its tensors.

    Raises:
        PPQConfigError: when the path holds no readable native export, a file whose sha256
            differs from the one ``export.json`` records, or metadata that does not fit the
            stored tensors.
    """
    path = Path(path)
    verified_folder(path)
    file = path / WEIGHTS if path.is_dir() else path
    with open_safetensors(file) as handle:
        raw = (handle.metadata() or {}).get(FORMAT)
        if raw is None:
            raise PPQConfigError(
                f"{file} is a safetensors file but not a ppq export (no metadata)."
            )
        metadata = json.loads(raw)
        if metadata.get("version") not in READS:
            raise PPQConfigError(
                f"{file} is a ppq export of version {metadata.get('version')}; this "
                f"ppq-lightning reads versions {list(READS)}."
            )
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    declared_shapes(tensors, metadata, file)
    return tensors, metadata


def _shape(record: dict[str, Any], key: str, where: Path) -> torch.Size:
    shape = record.get("shape")
    if not (
        isinstance(shape, list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise PPQConfigError(f"{where}: the record of {key!r} declares shape {shape!r}.")
    if record.get("dtype") not in _DTYPES:
        raise PPQConfigError(
            f"{where}: the record of {key!r} declares dtype {record.get('dtype')!r}."
        )
    return torch.Size(shape)


def declared_shapes(
    tensors: dict[str, Tensor], metadata: dict[str, Any], where: Path
) -> dict[str, torch.Size]:
    """The shape of every tensor of the state dict a native export decodes to, each declared
    size checked against the stored tensors, so that nothing is allocated for a size the file
    does not hold (a crafted or corrupt header).

    Args:
        tensors: the file's tensors.
        metadata: the file's ``ppq`` metadata.
        where: the file, for the messages.

    Returns:
        ``{state-dict key: shape}`` of the decoded state dict.

    Raises:
        PPQConfigError: naming the file and the key whose record does not fit its tensor.
    """

    def fail(key: str, what: str) -> PPQConfigError:
        return PPQConfigError(
            f"{where} is corrupt or crafted: {key!r} {what}; refused before decoding."
        )

    for field, kind in (("encodings", dict), ("aliases", dict), ("extra_state", dict)):
        if not isinstance(metadata.get(field), kind):
            raise PPQConfigError(f"{where}: its metadata has no {field!r} record.")
    if metadata.get("dtype") not in _DTYPES:
        raise PPQConfigError(f"{where}: its metadata declares dtype {metadata.get('dtype')!r}.")
    extra = metadata["extra_state"]
    shapes = {key: t.shape for key, t in tensors.items()}
    on_grids: list[tuple[str, torch.Size, tuple[int, int], str, Any]] = []
    for key, value in extra.items():  # a mask's declared shape against its packed bits
        mask_shape = value.get("mask_shape") if isinstance(value, dict) else None
        if mask_shape is not None:
            bits_key = key.removesuffix("_extra_state") + "mask_bits"
            bits = tensors.get(metadata["aliases"].get(bits_key, bits_key))  # a shared module
            shape = _shape({"shape": mask_shape, "dtype": "torch.float32"}, key, where)
            if bits is None or bits.numel() != packed_size(shape.numel(), 1):
                raise fail(key, f"declares a mask of shape {list(shape)} that its bits do not hold")
    for key, record in metadata["encodings"].items():
        stored = tensors.get(key)
        if stored is None or not isinstance(record, dict):
            raise fail(key, "has a record but no tensor")
        encoding = record.get("encoding")
        if encoding == "fp16":
            if stored.dtype != torch.float16 or record.get("dtype") not in _DTYPES:
                raise fail(key, "is recorded as fp16 and stored otherwise")
            continue
        if encoding == "dense" and "shape" not in record:
            continue  # a view's weight, stored as is
        shape = _shape(record, key, where)
        shapes[key] = shape
        numel = shape.numel()
        if encoding == "dense":
            if stored.shape != shape:
                raise fail(key, f"declares shape {list(shape)} but stores {list(stored.shape)}")
            continue
        prefix = key[: -len("weight")] + STATE_NAME + "."
        state = extra.get(prefix + "_extra_state", {})
        mask_shape = state.get("mask_shape") if isinstance(state, dict) else None
        sparse = encoding == "values" or (encoding == "codes" and record.get("sparse"))
        if sparse and (mask_shape is None or torch.Size(mask_shape) != shape):
            raise fail(key, f"is stored sparse without a mask of its shape {list(shape)}")
        if encoding in _SCALE_BYTES:
            if stored.dtype != torch.uint8 or stored.shape != shape:
                raise fail(key, f"declares {list(shape)} {encoding} bytes but stores otherwise")
            continue
        if encoding == "values":
            if stored.numel() > numel:
                raise fail(key, f"stores {stored.numel()} values for {numel} weights")
            continue
        bits = record.get("bits")
        if encoding != "codes" or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise fail(key, f"has an unknown encoding {encoding!r} (bits {bits!r})")
        need = packed_size(numel, bits)
        if stored.dtype != torch.uint8 or (
            stored.numel() > need if sparse else stored.numel() != need
        ):
            raise fail(
                key, f"declares {numel} codes of {bits} bits but stores {stored.numel()} bytes"
            )
        if key.endswith("weight") and len(shape) >= 2:
            rows_cols = (
                (shape[1], shape[0])
                if record.get("transposed")
                else (shape[0], numel // max(shape[0], 1))
            )
            on_grids.append((key, shape, rows_cols, prefix, state))
    for key, shape, rows_cols, prefix, state in on_grids:  # every buffer's shape known now
        wrong = _grid_misfit(rows_cols, prefix, state, shapes)
        if wrong is not None:
            raise fail(key, f"of shape {list(shape)} has {wrong}")
    for key, layout in metadata.get("views", {}).items():
        shape = _shape(layout, key, where)
        parts = layout.get("parts")
        rows, end = 0, 0
        for part in parts if isinstance(parts, list) else [None]:
            if not (isinstance(part, list) and len(part) == 3 and part[0] in shapes):
                raise fail(key, f"has a view record {part!r} of no stored tensor")
            view_key, first, end = part
            view = shapes.pop(view_key)
            if first != rows or view[1:] != shape[1:] or view[0] != end - first:
                raise fail(
                    key,
                    f"of shape {list(shape)} has a view {view_key!r} of shape {list(view)} at "
                    f"rows {first}:{end}",
                )
            rows = end
        if rows != shape[0]:
            raise fail(key, f"declares {shape[0]} rows, its views hold {rows}")
        shapes[key] = shape
    for key, owner in metadata["aliases"].items():
        if owner not in shapes:
            raise fail(key, f"is an alias of {owner!r}, which the file lacks")
        shapes[key] = shapes[owner]
    return shapes


def _grid_misfit(
    rows_cols: tuple[int, int], prefix: str, state: Any, shapes: dict[str, torch.Size]
) -> str | None:
    """What is wrong with the grid buffers of a ``(rows, cols)`` weight stored as codes, for
    the refusal; None when their shapes fit its grid kind."""
    rows, cols = rows_cols
    extra = state if isinstance(state, dict) else {}
    grid_format = extra.get("grid_format", INT)
    try:
        kind = grid_kind(grid_format)
    except PPQConfigError:
        return f"an unknown grid format {grid_format!r}"

    def found(*names: str) -> str:
        return ", ".join(f"{n} {list(shapes.get(prefix + n) or [])}" for n in names)

    if kind == INT:
        scale = shapes.get(prefix + "scale")
        if scale is None or len(scale) != 2 or scale[0] != rows or not scale[1] or cols % scale[1]:
            return f"a grid of shape {list(scale or [])}"
        return None
    if kind == FLOAT:
        spec = SPECS[grid_format]
        group = spec.group_size or cols
        if (
            list(extra.get("grid_shape") or []) != [rows, cols]
            or rows % spec.block_rows
            or cols % group
        ):
            return f"a {grid_format} grid of shape {extra.get('grid_shape')!r}"
        wanted = torch.Size((rows // spec.block_rows, cols // group))
        held = shapes.get(prefix + "global_scale")
        if shapes.get(prefix + "scale") != wanted:
            return f"a {grid_format} grid whose {found('scale')} is not {list(wanted)}"
        if (grid_format == "nvfp4") != (held is not None and held.numel() == 1):
            return f"a {grid_format} grid with {found('global_scale')}"
        return None
    layout = LAYOUTS[grid_format]
    if cols % SUPER_BLOCK:
        return f"a {grid_format} grid, whose rows are not whole super-blocks of {SUPER_BLOCK}"
    per_block = torch.Size((rows, cols // SUPER_BLOCK))
    per_sub = torch.Size((rows, cols // layout.group_size))
    if any(shapes.get(prefix + n) != per_block for n in ("d", "dmin")) or any(
        shapes.get(prefix + n) != per_sub for n in ("sc", "m")
    ):
        return f"a {grid_format} grid with {found('d', 'dmin', 'sc', 'm')}"
    return None


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model exported with ``format="ppq"``: weights, masks, grids, histories and
    structural edits bit-identical to the exported model's, invariants checked.

    Args:
        path: the export folder (or its ``model.safetensors``).
        model: a freshly built, uncompressed model of the exported architecture (the same
            kind: network or LightningModule); needed only for a model the export cannot
            rebuild by itself (not a transformers model nor an ``ImageClassifierModule``).

    Returns:
        What was exported, eval mode: the LightningModule (``CausalLMModule``,
        ``ImageClassifierModule``) when a LightningModule was exported, else the network (a
        transformers model, a timm/torchvision model, or ``model``).

    Raises:
        PPQConfigError: on a missing, truncated or foreign file, or a model that does not fit.
        InvariantError: when the rebuilt weights break their recorded masks or grids.

    Example::

        from ppq_lightning.export import load_compressed
        model = load_compressed("exports/smollm2_gptq4")
    """
    tensors, metadata = read(path)
    dtype = _DTYPES[metadata["dtype"]]
    if model is None:  # the architecture the file declares, against its tensors first
        check_skeleton(
            lambda: wrap(build(metadata["architecture"], dtype), metadata.get("wrapper")),
            declared_shapes(tensors, metadata, Path(path)),
            metadata["extra_state"],
            str(path),
        )
        model = wrap(build(metadata["architecture"], dtype), metadata.get("wrapper"))
    enable_state_loading(model)
    state_dict = _decode(tensors, metadata)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise PPQConfigError(
            f"the export at {path} does not fit the model ({type(model).__name__}): {err}"
        ) from err
    check_invariants(model)
    return model.eval()
