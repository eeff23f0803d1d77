"""Finding and replacing modules of a model by their dotted names."""

from __future__ import annotations

from torch import nn


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``name`` and the attribute it is held under:
    ``parent_of(model, "layers.0.mlp") == (model.layers[0], "mlp")``; ``name`` may not exist yet.

    Raises:
        AttributeError: when the parent does not exist.
    """
    parent_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attribute


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model`` (replacing what is there)."""
    parent, attribute = parent_of(model, name)
    setattr(parent, attribute, new)


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """``model.get_submodule(name)``, or None when there is no such module."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
