"""Structural edits of a model: removing whole blocks (keeping its config consistent) and
removing rows/columns of layers (channels, heads), with their recorded state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from ppq_lightning.layers import as_matrix, is_compressible, weight_matrix


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attribute


def _configs(model: nn.Module) -> list[object]:
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            seen.setdefault(id(config), config)
    return list(seen.values())


_DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


def _set_depth(model: nn.Module, old: int, keep: list[int]) -> None:
    """Make HF configs agree with a block list of ``len(keep)`` blocks (was ``old``)."""
    for config in _configs(model):
        for field in _DEPTH_FIELDS:
            if getattr(config, field, None) == old:
                setattr(config, field, len(keep))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == old:
            config.layer_types = [layer_types[i] for i in keep]


def _depth_fields(model: nn.Module) -> list[tuple[object, str, object]]:
    """The HF config entries that :func:`_set_depth` may change, to put back as they were."""
    return [
        (config, field, getattr(config, field))
        for config in _configs(model)
        for field in (*_DEPTH_FIELDS, "layer_types")
        if getattr(config, field, None) is not None
    ]


def _renumber(blocks: nn.Module) -> None:
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


@contextlib.contextmanager
def without_blocks(
    model: nn.Module, name: str, drop: set[int], replace: dict[int, nn.Module] | None = None
) -> Iterator[None]:
    """Run ``model`` with the blocks ``drop`` of the container ``name`` left out, then restore.

    The HF configs' depth (``num_hidden_layers``, ``layer_types``) follows while in the context;
    the container and the configs are put back as they were whatever happens. Contexts nest
    (indices then refer to the container of the enclosing context).

    Args:
        model: the model.
        name: the name of the block container in ``model``.
        drop: the indices of the blocks to leave out.
        replace: modules to run in place of kept blocks, by index (their ``layer_types`` entry
            stays that of the block they stand for).
    """
    parent, attribute = _parent(model, name)
    container = getattr(parent, attribute)
    keep = [i for i in range(len(container)) if i not in drop]
    saved = _depth_fields(model)
    setattr(parent, attribute, _subset(container, keep, replace))
    try:
        _set_depth(model, len(container), keep)
        yield
    finally:
        setattr(parent, attribute, container)
        for config, field, value in saved:
            setattr(config, field, value)


def _subset(
    container: nn.Module, keep: list[int], replace: dict[int, nn.Module] | None = None
) -> nn.Module:
    blocks = [(replace or {}).get(i, container[i]) for i in keep]
    return nn.ModuleList(blocks) if isinstance(container, nn.ModuleList) else nn.Sequential(*blocks)


def remove_blocks(model: nn.Module, name: str, indices: list[int]) -> int:
    """Delete the blocks ``indices`` of the container ``name`` for good.

    HF configs (``num_hidden_layers``, ``layer_types``) and the blocks' ``layer_idx`` are
    updated to the new depth.

    Returns:
        The number of original weights of the compressible layers removed (a layer shared with
        a kept block, such as a shared basis, stays and is not counted).
    """
    from ppq_lightning.metrics import original_weights
    from ppq_lightning.state import get_state

    parent, attribute = _parent(model, name)
    container = getattr(parent, attribute)
    drop = set(indices)
    keep = [i for i in range(len(container)) if i not in drop]
    staying = {id(m) for i in keep for m in container[i].modules()}
    gone = {
        id(m): m
        for i in sorted(drop)
        for m in container[i].modules()
        if is_compressible(m) and id(m) not in staying
    }
    removed = sum(original_weights(m, get_state(m)) for m in gone.values())
    setattr(parent, attribute, _subset(container, keep))
    _set_depth(model, len(container), keep)
    _renumber(getattr(parent, attribute))
    return removed


def _slice_state(module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
    from ppq_lightning.errors import PPQConfigError
    from ppq_lightning.state import get_state

    state = get_state(module)
    if state is None:
        return
    if state.mask is not None:
        mask = as_matrix(module, state.mask)
        mask = mask[rows] if rows is not None else mask
        mask = mask[:, cols] if cols is not None else mask
        state.mask = mask
    if state.scale is not None:
        if cols is not None and state.group_size is not None:
            raise PPQConfigError(
                "channel pruning cannot remove input columns of a layer quantized with "
                f"group_size={state.group_size}: prune channels before quantizing, or quantize "
                "per channel."
            )
        if rows is not None:
            state.scale, state.zero = state.scale[rows], state.zero[rows]


def select_rows(module: nn.Module, rows: Tensor) -> None:
    """Keep only the output rows ``rows`` of a layer (its weight matrix, bias, recorded state)."""
    matrix = weight_matrix(module)[rows].clone()  # (kept, in)
    module.weight = nn.Parameter(
        to_weight_layout_shape(module, matrix), requires_grad=module.weight.requires_grad
    )
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(
            module.bias.data[rows].clone(), requires_grad=module.bias.requires_grad
        )
    _set_features(module)
    _slice_state(module, rows, None)


def select_columns(module: nn.Module, cols: Tensor) -> None:
    """Keep only the input columns ``cols`` of a layer (weight matrix and recorded state)."""
    matrix = weight_matrix(module)[:, cols].clone()  # (out, kept)
    module.weight = nn.Parameter(
        to_weight_layout_shape(module, matrix), requires_grad=module.weight.requires_grad
    )
    _set_features(module)
    _slice_state(module, None, cols)


def to_weight_layout_shape(module: nn.Module, matrix: Tensor) -> Tensor:
    """An ``(out, in)`` matrix in the storage layout of ``module`` (Linear or GPT-2 Conv1D)."""
    if isinstance(module, nn.Linear):
        return matrix.contiguous()
    if type(module).__name__ == "Conv1D":
        return matrix.t().contiguous()
    raise TypeError(f"channel pruning supports nn.Linear and GPT-2 Conv1D, not {type(module)}")


def _set_features(module: nn.Module) -> None:
    out_features, in_features = weight_matrix(module).shape
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_features, in_features
    else:  # GPT-2 Conv1D
        module.nf, module.nx = out_features, in_features
