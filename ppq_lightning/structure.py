"""Structural edits of a model: removing whole blocks (and keeping its config consistent)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ppq_lightning.layers import is_compressible


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


def _set_depth(model: nn.Module, old: int, keep: list[int]) -> None:
    """Make HF configs agree with a block list of ``len(keep)`` blocks (was ``old``)."""
    for config in _configs(model):
        for field in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(config, field, None) == old:
                setattr(config, field, len(keep))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == old:
            config.layer_types = [layer_types[i] for i in keep]


def _renumber(blocks: nn.Module) -> None:
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


@contextlib.contextmanager
def without_blocks(model: nn.Module, name: str, drop: set[int]) -> Iterator[None]:
    """Run ``model`` with the blocks ``drop`` of the container ``name`` left out, then restore."""
    parent, attribute = _parent(model, name)
    container = getattr(parent, attribute)
    keep = [i for i in range(len(container)) if i not in drop]
    setattr(parent, attribute, _subset(container, keep))
    _set_depth(model, len(container), keep)
    try:
        yield
    finally:
        setattr(parent, attribute, container)
        _set_depth(model, len(keep), list(range(len(container))))


def _subset(container: nn.Module, keep: list[int]) -> nn.Module:
    blocks = [container[i] for i in keep]
    return nn.ModuleList(blocks) if isinstance(container, nn.ModuleList) else nn.Sequential(*blocks)


def remove_blocks(model: nn.Module, name: str, indices: list[int]) -> int:
    """Delete the blocks ``indices`` of the container ``name`` for good.

    HF configs (``num_hidden_layers``, ``layer_types``) and the blocks' ``layer_idx`` are
    updated to the new depth.

    Returns:
        The number of weights of compressible layers removed.
    """
    parent, attribute = _parent(model, name)
    container = getattr(parent, attribute)
    drop = set(indices)
    keep = [i for i in range(len(container)) if i not in drop]
    removed = sum(
        m.weight.numel() for i in drop for m in container[i].modules() if is_compressible(m)
    )
    setattr(parent, attribute, _subset(container, keep))
    _set_depth(model, len(container), keep)
    _renumber(getattr(parent, attribute))
    return removed
