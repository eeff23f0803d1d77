"""Compressed state recorded on modules: mask, quantization grid and stage history.

Each compressed module (an ``nn.Linear`` or ``nn.Conv2d``) carries a child module
``ppq_state`` (a :class:`CompressionState`). Its buffers (``mask``, ``scale``, ``zero``) and its
extra state (grid settings, history) travel with ``state_dict()`` and therefore with every
Lightning checkpoint. A model that is loaded from such a state dict gets its ``ppq_state``
children created on the fly (see :func:`enable_state_loading`).

The invariants (``shared/DESIGN.md``) that :func:`check_invariants` tests:

1. every entry pruned by the recorded mask is exactly zero;
2. every weight lies on the recorded quantization grid (up to the rounding of the weight's own
   dtype), and zero is a grid point.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.errors import InvariantError
from ppq_lightning.layers import as_matrix, to_weight_layout, weight_matrix
from ppq_lightning.ops.masks import pack_mask, unpack_mask
from ppq_lightning.ops.quant_grid import QuantGrid

STATE_NAME = "ppq_state"
_LOADING_HOOK_FLAG = "_ppq_state_loading_enabled"


class CompressionState(nn.Module):
    """What compression stages did to the weight of the module that owns this child.

    Attributes:
        mask: bool tensor shaped like the weight (True = kept), or None if never pruned;
            stored packed, one bit per weight (buffer ``mask_bits``), and unpacked on access.
        scale, zero: grid parameters ``(rows, n_groups)`` of the last quantization, or None.
        bits, group_size, symmetric: settings of that grid.
        history: one dict per stage applied, in order: ``{"stage": state_key, "method": ...}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask_bits", None)
        self.mask_shape: tuple[int, ...] | None = None
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.bits: int | None = None
        self.group_size: int | None = None
        self.symmetric: bool = False
        self.history: list[dict[str, Any]] = []
        self.register_load_state_dict_pre_hook(_materialize_buffers)

    @property
    def mask(self) -> Tensor | None:
        if self.mask_bits is None or self.mask_shape is None:
            return None
        return unpack_mask(self.mask_bits, self.mask_shape)

    @mask.setter
    def mask(self, mask: Tensor | None) -> None:
        self.mask_bits = None if mask is None else pack_mask(mask.bool())
        self.mask_shape = None if mask is None else tuple(mask.shape)

    @property
    def grid(self) -> QuantGrid | None:
        if self.scale is None or self.bits is None:
            return None
        return QuantGrid(self.scale, self.zero, self.bits, self.group_size, self.symmetric)

    @property
    def stages(self) -> list[str]:
        return [entry["stage"] for entry in self.history]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "mask_shape": list(self.mask_shape) if self.mask_shape is not None else None,
            "history": [dict(entry) for entry in self.history],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits = state["bits"]
        self.group_size = state["group_size"]
        self.symmetric = state["symmetric"]
        shape = state.get("mask_shape")
        self.mask_shape = tuple(shape) if shape is not None else None
        self.history = [dict(entry) for entry in state["history"]]

    def extra_repr(self) -> str:
        parts = []
        if self.mask is not None:
            parts.append(f"sparsity={1 - self.mask.float().mean().item():.3f}")
        if self.bits is not None:
            parts.append(f"bits={self.bits}, group_size={self.group_size}")
        parts.append(f"stages={self.stages}")
        return ", ".join(parts)


def _materialize_buffers(module: CompressionState, state_dict: dict, prefix: str, *args) -> None:
    """Give still-empty buffers the shape of the tensors about to be loaded into them."""
    for name in ("mask_bits", "scale", "zero"):
        key = prefix + name
        if key in state_dict and getattr(module, name) is None:
            module._buffers[name] = torch.empty_like(state_dict[key])


def get_state(module: nn.Module) -> CompressionState | None:
    """The :class:`CompressionState` of ``module``, or None if it was never compressed."""
    state = getattr(module, STATE_NAME, None)
    return state if isinstance(state, CompressionState) else None


def ensure_state(module: nn.Module) -> CompressionState:
    """The :class:`CompressionState` of ``module``, created if missing."""
    state = get_state(module)
    if state is None:
        tensor = next(module.parameters(), None)
        state = CompressionState()
        if tensor is not None:
            state = state.to(tensor.device)
        module.add_module(STATE_NAME, state)
    return state


def current_mask(module: nn.Module) -> Tensor | None:
    """The recorded mask of ``module`` as an ``(out, in)`` matrix, or None if never pruned."""
    state = get_state(module)
    return None if state is None or state.mask is None else as_matrix(module, state.mask)


def current_grid(module: nn.Module) -> QuantGrid | None:
    """The recorded quantization grid of ``module``, or None if never quantized."""
    state = get_state(module)
    return None if state is None else state.grid


def record_stage(module: nn.Module, entry: dict[str, Any]) -> CompressionState:
    """Append a stage's record to the history of ``module`` (once per stage and module)."""
    state = ensure_state(module)
    state.history.append(dict(entry))
    return state


def record_mask(module: nn.Module, mask: Tensor) -> CompressionState:
    """Zero the pruned weights of ``module`` and record ``mask`` (combined with any older one).

    Args:
        module: the compressed layer.
        mask: bool, True = kept, in the ``(out, in)`` matrix layout of ``weight_matrix``.
    """
    state = ensure_state(module)
    mask = to_weight_layout(module, mask.to(device=module.weight.device, dtype=torch.bool))
    if state.mask is not None:
        mask = mask & state.mask
    module.weight.data.mul_(mask)
    state.mask = mask.contiguous()
    return state


def record_grid(module: nn.Module, grid: QuantGrid) -> CompressionState:
    """Record ``grid`` as the module's quantization grid (replacing an older one)."""
    state = ensure_state(module)
    state.scale = grid.scale.to(module.weight.device, torch.float32)
    state.zero = grid.zero.to(module.weight.device, torch.float32)
    state.bits, state.group_size, state.symmetric = grid.bits, grid.group_size, grid.symmetric
    return state


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, CompressionState]]:
    """Every ``(name, module, state)`` of ``model`` that carries a compression state."""
    for name, module in model.named_modules():
        state = get_state(module)
        if state is not None:
            yield name, module, state


def applied_stages(model: nn.Module) -> set[str]:
    """The state keys of every stage recorded anywhere in ``model``."""
    return {stage for _, _, state in compressed_modules(model) for stage in state.stages}


def _grid_tolerance(w: Tensor, grid: QuantGrid) -> Tensor:
    """Allowed distance to the grid in steps: the weight dtype's rounding of a grid point."""
    eps = torch.finfo(w.dtype).eps
    step = grid._expand(grid.scale, w.shape[1])
    return 1e-4 + eps * grid.fake_quantize(w).abs() / step


def check_invariants(model: nn.Module) -> int:
    """Check every compressed module of ``model`` against its recorded mask and grid.

    Args:
        model: any module tree, e.g. a LightningModule or a HF model.

    Returns:
        The number of compressed modules checked.

    Raises:
        InvariantError: naming the module, when a pruned weight is non-zero or a weight lies
            off its recorded quantization grid.
    """
    checked = 0
    for name, module, state in compressed_modules(model):
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # a structural record (e.g. removed blocks on their container): no weight
        weight = module.weight.detach()
        if state.mask is not None:
            revived = int((weight[~state.mask] != 0).sum())
            if revived:
                raise InvariantError(
                    f"{name}: {revived} pruned weight(s) are non-zero; the mask recorded by "
                    f"stages {state.stages} says they must stay exactly 0."
                )
        grid = state.grid
        if grid is not None:
            grid = grid.to(weight.device)
            w = weight_matrix(module)
            distance = grid.off_grid_distance(w)
            off = int((distance > _grid_tolerance(w, grid)).sum())
            if off:
                raise InvariantError(
                    f"{name}: {off} weight(s) lie off the {grid.bits}-bit grid recorded by stages "
                    f"{state.stages} (largest distance {distance.max().item():.3g} steps)."
                )
        checked += 1
    return checked


def _replay_structure(
    model: nn.Module, owner: str, target: nn.Module, history: list[dict[str, Any]]
) -> None:
    """Re-apply recorded structural edits (removed blocks, pruned channels, layers replaced by
    shared-basis factors) to a fresh model before loading."""
    from ppq_lightning.sharing import replay_shared_basis
    from ppq_lightning.structure import remove_blocks, select_columns, select_rows

    done = set(get_state(target).stages) if get_state(target) is not None else set()
    for entry in history:
        if entry["stage"] in done:
            continue
        if "removed" in entry and "container" in entry:
            remove_blocks(model, f"{owner}.{entry['container']}", entry["removed"])
        if "kept_rows" in entry:
            select_rows(target, torch.tensor(entry["kept_rows"]))
        if "kept_cols" in entry:
            select_columns(target, torch.tensor(entry["kept_cols"]))
        if "shared_basis" in entry:
            replay_shared_basis(model, owner, entry["shared_basis"])


def _replay_adapters(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Re-inject unmerged LoRA adapters (``...q_proj.lora_A.default.weight`` keys) into a fresh
    model, with the rank in the tensors and ``alpha``/``dropout`` recorded on the base layers."""
    from ppq_lightning.adapters import replay_lora

    marker = ".lora_A."
    owners = sorted({key[len(prefix) :].split(marker)[0] for key in state_dict if marker in key})
    missing = []
    for owner in owners:
        try:
            model.get_submodule(f"{owner}.base_layer")
        except AttributeError:
            missing.append(owner)
    if missing:
        replay_lora(model, missing, state_dict, prefix)


def enable_state_loading(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` create the ``ppq_state`` children its input needs.

    A fresh model has no compression state, so the keys ``...q_proj.ppq_state.mask`` of a
    compressed checkpoint would be unexpected. This registers (once) a pre-hook on ``model``
    that attaches an empty :class:`CompressionState` wherever the state dict has one (and
    first replays the recorded structural edits: removed blocks, pruned channels, shared-basis
    factors, unmerged LoRA adapters); the normal loading then fills it.
    """
    if getattr(model, _LOADING_HOOK_FLAG, False):
        return
    marker = f".{STATE_NAME}."

    def attach_states(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        _replay_adapters(module, state_dict, prefix)
        owners = {key[len(prefix) :].split(marker)[0] for key in state_dict if marker in key}
        for owner in sorted(owners):
            try:
                target = module.get_submodule(owner)
            except AttributeError:
                continue  # reported by load_state_dict as unexpected keys
            extra = state_dict.get(f"{prefix}{owner}{marker}_extra_state")
            if isinstance(extra, dict):
                _replay_structure(module, owner, target, extra.get("history", []))
                target = module.get_submodule(owner)  # a replayed edit may have replaced it
            ensure_state(target)

    model.register_load_state_dict_pre_hook(attach_states)
    setattr(model, _LOADING_HOOK_FLAG, True)
