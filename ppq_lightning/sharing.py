"""Layers that share a low-rank basis across blocks (basis sharing, ``ops/basis_sharing.py``).

A factorised projection ``W_i ~= C_i B`` becomes a :class:`SharedBasisLinear`: the shared basis
``B`` is an ``nn.Linear(in, k, bias=False)`` module that is the *same object* in every layer of
its group, and the coefficients ``C_i`` an ``nn.Linear(k, out, bias=<original bias>)`` of its
own. Both factors are plain ``nn.Linear`` layers, so later stages (pruning, quantization) target
them like any other layer, and ``named_modules()`` yields a shared basis once.

The replacement is recorded in the history of the :class:`SharedBasisLinear` (key
``"shared_basis"``: group, shapes, rank, bias), so that :func:`replay_shared_basis` rebuilds the
same structure, with the same sharing, in a fresh model before a state dict is loaded into it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ppq_lightning.errors import PPQConfigError


class SharedBasisLinear(nn.Module):
    """``y = coefficients(basis(x))``: a linear layer of rank ``k`` whose basis is shared.

    Args:
        basis: ``nn.Linear(in, k, bias=False)``, the same module in every layer of the group.
        coefficients: ``nn.Linear(k, out)``, this layer's own (it carries the original bias).
        group: an identifier of the sharing group (the same string for every member).
    """

    def __init__(self, basis: nn.Linear, coefficients: nn.Linear, group: str) -> None:
        super().__init__()
        self.basis = basis
        self.coefficients = coefficients
        self.group = group

    @property
    def in_features(self) -> int:
        return self.basis.in_features

    @property
    def out_features(self) -> int:
        return self.coefficients.out_features

    @property
    def rank(self) -> int:
        return self.basis.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.coefficients(self.basis(x))  # (..., in) -> (..., k) -> (..., out)

    def extra_repr(self) -> str:
        return f"group={self.group!r}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, new)


def find_basis(model: nn.Module, group: str) -> nn.Linear | None:
    """The shared basis of ``group`` already in ``model``, or None."""
    for module in model.modules():
        if isinstance(module, SharedBasisLinear) and module.group == group:
            return module.basis
    return None


def sharing_record(layer: SharedBasisLinear) -> dict[str, Any]:
    """What :func:`replay_shared_basis` needs to rebuild ``layer`` (stored in its history)."""
    return {
        "group": layer.group,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "bias": layer.coefficients.bias is not None,
    }


def replay_shared_basis(model: nn.Module, name: str, record: dict[str, Any]) -> None:
    """Replace the layer ``name`` of a fresh ``model`` by an empty :class:`SharedBasisLinear`
    with the recorded shapes, reusing the basis of its group when a member already has it.

    The values come from the state dict loaded afterwards. The new factors take the dtype and
    device of the layer they replace.

    Raises:
        PPQConfigError: when a basis of the group already in ``model`` has another shape.
    """
    old = model.get_submodule(name)
    like = next(old.parameters(), None)
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    in_features, rank = record["in_features"], record["rank"]
    basis = find_basis(model, record["group"])
    if basis is None:
        basis = nn.Linear(in_features, rank, bias=False, **factory)
    elif (basis.out_features, basis.in_features) != (rank, in_features):
        raise PPQConfigError(
            f"{name}: the recorded shared basis ({rank}, {in_features}) of group "
            f"{record['group']!r} disagrees with the group's basis already rebuilt "
            f"({basis.out_features}, {basis.in_features})."
        )
    coefficients = nn.Linear(rank, record["out_features"], bias=record["bias"], **factory)
    layer = SharedBasisLinear(basis, coefficients, record["group"]).train(old.training)
    replace_module(model, name, layer)
