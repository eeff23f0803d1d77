"""Layers that share a low-rank basis across blocks (the edit of ``BasisSharing``).

A factorised projection ``W_i ~= C_i B`` (``ppq_lightning.ops.basis_sharing``) becomes a
:class:`SharedBasisLinear`: the shared basis ``B`` is an ``nn.Linear(in, k, bias=False)`` module
that is the *same object* in every layer of its group, and the coefficients ``C_i`` an
``nn.Linear(k, out, bias=<original bias>)`` of its own. Both factors are plain ``nn.Linear``
layers, so later stages (pruning, quantization) target them like any other layer, and
``named_modules()`` yields a shared basis once.

:func:`plan_sharing` groups the same projection of consecutive blocks and checks everything
before any layer is replaced; :func:`share_group` factorises one group and replaces its layers.
The replacement is recorded in the history of the :class:`SharedBasisLinear` (edit
``"shared_basis"``: group, shapes, rank, bias), so that :func:`replay_shared_basis` rebuilds the
same structure, with the same sharing, in a fresh model before a state dict is loaded into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ppq_lightning.calibration.blocks import find_blocks
from ppq_lightning.compressed.history import HistoryEntry, recorded_size
from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.modules.attention import AttentionProjection
from ppq_lightning.modules.tree import replace_module
from ppq_lightning.modules.views import is_compressible, is_convolution, weight_matrix
from ppq_lightning.ops.basis_sharing import factor_params, max_rank, rank_for_ratio, shared_basis

SHARED_BASIS = "shared_basis"


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


def _linear(in_features: int, out_features: int, bias: bool, like: Tensor | None) -> nn.Linear:
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return nn.Linear(in_features, out_features, bias=bias, **factory)


def new_shared_layer(
    group: str,
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool,
    like: Tensor | None,
    basis: nn.Linear | None = None,
) -> SharedBasisLinear:
    """An empty :class:`SharedBasisLinear` of the given shapes: its basis (``basis``, shared,
    or a new ``nn.Linear(in, rank)``) and new coefficients ``nn.Linear(rank, out)``, in the
    dtype and on the device of ``like`` (values to be filled in by the caller or a state dict).
    """
    basis = _linear(in_features, rank, False, like) if basis is None else basis
    coefficients = _linear(rank, out_features, bias, like)
    return SharedBasisLinear(basis, coefficients, group)


def replay_shared_basis(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Replace the layer ``owner`` of a fresh ``model`` by an empty :class:`SharedBasisLinear`
    with the shapes ``entry`` recorded, reusing the basis of its group when a member already
    has it.

    The values come from the state dict loaded afterwards. The new factors take the dtype and
    device of the layer they replace.

    Raises:
        PPQConfigError: when a basis of the group already in ``model`` has another shape.
    """
    record = entry[SHARED_BASIS]
    old = model.get_submodule(owner)
    rows, cols = weight_matrix(old).shape  # the dense layer the factors replace
    in_features = recorded_size(owner, entry, "in_features", record["in_features"], cols)
    recorded_size(owner, entry, "out_features", record["out_features"], rows)
    rank = recorded_size(owner, entry, "rank", record["rank"], in_features)
    basis = find_basis(model, record["group"])
    if basis is not None and (basis.out_features, basis.in_features) != (rank, in_features):
        raise PPQConfigError(
            f"{owner}: the recorded shared basis ({rank}, {in_features}) of group "
            f"{record['group']!r} disagrees with the group's basis already rebuilt "
            f"({basis.out_features}, {basis.in_features})."
        )
    layer = new_shared_layer(
        record["group"],
        in_features,
        record["out_features"],
        rank,
        record["bias"],
        next(old.parameters(), None),
        basis,
    )
    replace_module(model, owner, layer.train(old.training))


@dataclass
class SharingGroup:
    """One sharing group: the same projection in consecutive blocks.

    Attributes:
        projection: the layer's name inside its block, e.g. ``"self_attn.q_proj"``.
        names: the layers' full names, in block order.
        layers: the layers.
        rank: the rank ``k`` of the group's basis.
    """

    projection: str
    names: list[str]
    layers: list[nn.Module]
    rank: int


def _projections(
    model: nn.Module, modules: dict[str, nn.Module], projections: list[str], group_size: int
) -> dict[str, list[tuple[str, nn.Module]]]:
    """``{projection name in the block: [(full name, layer), ...] in block order}``."""
    patterns = [re.compile(rf"(?:^|\.)(?:{p})$") for p in projections]
    found = find_blocks(model)
    if found is None:
        raise PPQConfigError(
            "BasisSharing needs a model with repeated blocks (an nn.ModuleList of identical "
            "blocks); none was found."
        )
    container_name, blocks = found
    if group_size > len(blocks):
        raise bad_value(
            "group_size",
            group_size,
            f"an integer from 2 to {len(blocks)} (the model has {len(blocks)} blocks in "
            f"{container_name})",
        )
    selected = {id(m) for m in modules.values()}
    matched = [False] * len(patterns)
    chosen: dict[str, list[tuple[str, nn.Module]]] = {}
    linear_names: list[str] = []
    prefix = f"{container_name}." if container_name else ""
    # blocks by their own names: an nn.Sequential(OrderedDict(...)) names them (torchvision's
    # ViT: encoder.layers.encoder_layer_0), an nn.ModuleList by position
    for child, block in blocks.named_children():
        factorised = [n for n, m in block.named_modules() if isinstance(m, SharedBasisLinear)]
        for inner, layer in block.named_modules():
            hits = [i for i, p in enumerate(patterns) if p.search(inner)]
            full = f"{prefix}{child}.{inner}"
            inside = [n for n in factorised if inner == n or inner.startswith(n + ".")]
            if hits and inside:
                raise PPQConfigError(
                    f"projections={projections!r} matches {full}, which is already "
                    f"factorised with a shared basis ({prefix}{child}.{inside[0]}); "
                    "a projection can be shared once."
                )
            if not is_compressible(layer) or is_convolution(layer):
                continue
            linear_names.append(inner)
            if not hits or id(layer) not in selected:
                continue
            if isinstance(layer, AttentionProjection):
                raise PPQConfigError(
                    f"projections={projections!r} matches {full}, a view of the in_proj_weight "
                    "of an nn.MultiheadAttention: BasisSharing replaces a layer by factors, and "
                    "this one's weight would stay in in_proj_weight. Leave it out of "
                    "`projections` (or list it in `ignore`); its out_proj can be shared."
                )
            state = get_state(layer)
            if state is not None:
                raise PPQConfigError(
                    f"{full} is already compressed by stages {state.stages}; BasisSharing "
                    "factorises dense weights: put it before pruning and quantization "
                    "(S>P>Q)."
                )
            for i in hits:
                matched[i] = True
            chosen.setdefault(inner, []).append((full, layer))
    missing = [p for p, hit in zip(projections, matched, strict=True) if not hit]
    if missing:
        sample = ", ".join(list(dict.fromkeys(linear_names))[:8]) or "none"
        raise PPQConfigError(
            f"projections {missing} matched no selected linear layer inside the blocks "
            f"(layer names in a block: {sample}). Please check `projections` "
            "(and `targets`/`ignore`)."
        )
    return chosen


def _group_rank(
    names: list[str], out_features: int, in_features: int, rank: int | None, ratio: float | None
) -> int:
    g = len(names)
    top = max_rank(in_features, [out_features] * g)
    if rank is not None:
        if rank > top:
            raise bad_value(
                "rank",
                rank,
                f"an integer from 1 to {top} = min(in, g*out) for the group {names} "
                f"({g} x ({out_features}, {in_features}))",
            )
        return rank
    rank = rank_for_ratio(ratio, g, out_features, in_features)
    if rank < 1:
        raise bad_value(
            "ratio",
            ratio,
            f"a ratio giving rank >= 1 for the group {names} ({g} x ({out_features}, "
            f"{in_features})); it gives rank 0",
        )
    return rank


def plan_sharing(
    model: nn.Module,
    modules: dict[str, nn.Module],
    projections: list[str],
    group_size: int,
    rank: int | None = None,
    ratio: float | None = None,
) -> list[SharingGroup]:
    """Group the layers of each projection of ``model``'s blocks into sharing groups of
    ``group_size`` consecutive blocks (a last group may be smaller), with every check made
    before any layer is replaced.

    Args:
        model: the model; its repeated blocks are ``calibration.blocks.find_blocks``'s.
        modules: the selected candidate layers (by full name).
        projections: regexes naming projections inside a block, each matching the end of a
            layer's name within the block at a ``.`` boundary (``"q_proj"``).
        group_size: blocks sharing one basis.
        rank, ratio: the rank of every basis, or the fraction of each group's weights kept.

    Raises:
        PPQConfigError: no repeated blocks; ``group_size`` larger than the number of blocks; a
            projection that matches no selected layer; a matched layer already factorised or
            compressed; layers of one group with different shapes or bias; a rank above
            ``min(in, g*out)`` of a group, or a ``ratio`` that gives rank 0.
    """
    groups = []
    for projection, members in _projections(model, modules, projections, group_size).items():
        for start in range(0, len(members), group_size):
            chunk = members[start : start + group_size]
            names = [name for name, _ in chunk]
            layers = [layer for _, layer in chunk]
            shapes = [tuple(weight_matrix(m).shape) for m in layers]
            biases = [getattr(m, "bias", None) is not None for m in layers]
            if len(set(shapes)) > 1 or len(set(biases)) > 1:
                raise PPQConfigError(
                    f"the layers {names} share a basis but differ: weight shapes {shapes}, "
                    f"bias {biases}; every layer of a group needs one shape and bias."
                )
            out_features, in_features = shapes[0]
            groups.append(
                SharingGroup(
                    projection,
                    names,
                    layers,
                    _group_rank(names, out_features, in_features, rank, ratio),
                )
            )
    return groups


def share_group(
    model: nn.Module,
    group: SharingGroup,
    key: str,
    entry: HistoryEntry,
    whitening: Tensor | None = None,
    split: str = "balanced",
) -> dict[str, dict[str, float]]:
    """Factorise ``group`` (``ops.basis_sharing.shared_basis``) and replace its layers by
    :class:`SharedBasisLinear` layers sharing one basis; record the edit; return per-layer
    metrics.

    Args:
        model: the model holding the layers.
        group: the group from :func:`plan_sharing`.
        key: the group's identifier (the same string for every member).
        entry: the stage's history entry.
        whitening: the Cholesky factor of the group's input Hessian (whitened sharing) or None.
        split: how the singular values are split between the factors.
    """
    weights = [weight_matrix(m) for m in group.layers]  # g x (out, in)
    factors = shared_basis(weights, group.rank, whitening, split)
    like = weights[0]
    out_features, in_features = like.shape
    basis = None
    metrics = {}
    for name, layer, c, error in zip(
        group.names, group.layers, factors.coefficients, factors.relative_errors, strict=True
    ):
        bias = getattr(layer, "bias", None)
        shared = new_shared_layer(
            key, in_features, out_features, group.rank, bias is not None, like, basis
        )
        if basis is None:  # the group's first member: the basis is new
            basis = shared.basis
            basis.weight.data.copy_(factors.basis)  # (k, in)
            basis.weight.requires_grad_(group.layers[0].weight.requires_grad)
            record_stage(basis, {**entry, "original_weights": 0})
        coefficients = shared.coefficients
        coefficients.weight.data.copy_(c)  # (out, k)
        coefficients.weight.requires_grad_(layer.weight.requires_grad)
        if bias is not None:
            coefficients.bias.data.copy_(bias.data)
            coefficients.bias.requires_grad_(bias.requires_grad)
        record_stage(coefficients, {**entry, "original_weights": out_features * in_features})
        shared.train(layer.training)
        record_stage(shared, {**entry, "edit": SHARED_BASIS, SHARED_BASIS: sharing_record(shared)})
        replace_module(model, name, shared)
        metrics[name] = {
            "rank": float(group.rank),
            "relative_error": error,
            "params": float(group.rank * out_features),
            "basis_params": float(group.rank * in_features),
            "group_params": float(
                factor_params(group.rank, in_features, [out_features] * len(group.names))
            ),
            "original_params": float(out_features * in_features),
            "group_size": float(len(group.names)),
        }
    return metrics
