"""Structured channel pruning of any CNN or ViT through Torch-Pruning's dependency graph (the
edit of ``DepGraphPruning``; DepGraph, Fang et al., CVPR 2023).

Removing an output channel of a convolution also removes the matching BatchNorm channel, the
input channel of every layer that reads it and, through residual additions and
concatenations, the coupled channels of other layers: Torch-Pruning traces those couplings once
(``DependencyGraph``) and prunes each group of coupled channels together, so the network stays
valid and really shrinks. Groups are ranked by the L2 norm of their weights. A ViT's attention
heads are pruned whole (``num_heads``), and the attention modules learn their new head count.

The pruning is recorded on the model (Torch-Pruning's own ``pruning_history``: module, kind,
indices per step, with the shape of the example input), so that a fresh model is pruned the same
way before a state dict of the pruned model is loaded into it. Layers compressed by earlier
stages keep their mask and grid: the recorded state is sliced with the weights (a grid with
input groups cannot lose input channels, as with ``ChannelPruning``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.accounting import counted_layers
from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.edits.channels import check_columns_removable, slice_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.attention import PROJECTIONS, projection_views_hidden
from ppq_lightning.modules.produced import ProducedBy
from ppq_lightning.modules.views import is_compressible, weight_matrix

DEPGRAPH_PRUNING = "depgraph_channels"


def output_layers(model: nn.Module, example: Tensor) -> list[nn.Module]:
    """The layers whose output is the model's output (a classifier, an LM head): pruning their
    output channels would change what the model predicts (its number of classes), so channel
    pruning leaves them whole, on any model. Found by one forward of ``example``: the leaf
    modules whose output tensor is the one the model returns (or its ``logits``): the same
    object, not one that reuses a freed output's id (:class:`ProducedBy`)."""
    produced: ProducedBy[nn.Module] = ProducedBy()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            produced.record(output, module)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    output = getattr(output, "logits", output)
    outputs = output if isinstance(output, (tuple, list)) else [output]
    found = [produced.get(o, unmodified=False) for o in outputs]
    return [module for module in found if module is not None]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The fused ``qkv`` projections of timm attention modules and their head counts."""
    return {
        m.qkv: m.num_heads
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "num_heads", None), int)
    }


def _set_heads(model: nn.Module, pruner: Any) -> dict[str, int]:
    """Give timm attention modules their head count after pruning; returns it by module name."""
    counts = {}
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        if qkv is not None and qkv in pruner.num_heads:
            _give_heads(m, pruner.num_heads[qkv])
            counts[name] = m.num_heads
    return counts


def _give_heads(attention: nn.Module, count: int) -> None:
    """A timm attention module's head count and the sizes derived from it."""
    attention.num_heads = count
    attention.head_dim = attention.qkv.out_features // (3 * count)
    if hasattr(attention, "attn_dim"):
        attention.attn_dim = count * attention.head_dim


def _counted_weights(model: nn.Module, names: set[str]) -> int:
    """Weights of the layers ``names`` (those the compression rate counts)."""
    return sum(m.weight.numel() for n, m in model.named_modules() if n in names)


def kernel_area(module: nn.Module) -> int:
    """Weight-matrix columns per input channel: ``kh * kw`` of a conv, 1 of a linear layer."""
    return module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1


def _kept(size: int, pruned: list[int]) -> Tensor:
    drop = set(pruned)
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


def _slice_recorded(module: nn.Module, out_channel: bool, pruned: list[int], before: tuple) -> None:
    """Slice the recorded mask and grid of a layer Torch-Pruning just shrank (``before``: its
    weight matrix shape and, for a conv, its kernel size before pruning). A depthwise conv's
    channels are its rows whichever side is pruned."""
    rows, cols = before[0]
    if out_channel or (isinstance(module, nn.Conv2d) and module.groups > 1):
        slice_state(module, _kept(rows, pruned), None)
        return
    kernel = before[1]
    channels = _kept(cols // kernel, pruned)  # input channels kept
    columns = (channels[:, None] * kernel + torch.arange(kernel)).flatten()
    slice_state(module, None, columns)


def prune_channels(
    model: nn.Module,
    example: Tensor,
    ratio: float,
    ignored: list[nn.Module],
    entry: HistoryEntry,
    prune_heads: bool = False,
    round_to: int | None = None,
) -> dict[str, float]:
    """Remove ``ratio`` of the channels of every prunable group of ``model`` (smallest group
    L2 norm first), record the edit on ``model``, and return what was removed.

    Args:
        model: the model (its forward is traced once on ``example``).
        example: an input batch (one sample is enough).
        ratio: fraction of each group's channels (or, with ``prune_heads``, of each attention
            module's heads) to remove, in [0, 1).
        ignored: modules whose output channels are never pruned (the classifier).
        entry: the stage's history entry.
        prune_heads: prune whole attention heads of timm ViTs.
        round_to: keep channel counts multiples of this (hardware-friendly widths).

    Raises:
        PPQConfigError: when a layer quantized with input groups would lose input channels.
    """
    with torch.enable_grad():  # Torch-Pruning traces the forward through autograd
        return _prune_channels(model, example, ratio, ignored, entry, prune_heads, round_to)


def _prune_channels(
    model: nn.Module,
    example: Tensor,
    ratio: float,
    ignored: list[nn.Module],
    entry: HistoryEntry,
    prune_heads: bool = False,
    round_to: int | None = None,
) -> dict[str, float]:
    import torch_pruning as tp

    heads = attention_heads(model) if prune_heads else {}
    counted = set(counted_layers(model))  # removed weights count only where C counts them
    shapes = _recorded_shapes(model)
    with projection_views_hidden(model):  # traced: Torch-Pruning prunes the attention itself
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=heads,
            prune_num_heads=bool(heads),
            prune_head_dims=not heads,
            head_pruning_ratio=ratio if heads else 0.0,
            round_to=round_to,
        )
    groups = list(pruner.step(interactive=True))
    removed = _prune_groups(model, pruner.DG, groups, counted, shapes)
    head_counts = _set_heads(model, pruner) if heads else {}
    _record(model, example, pruner.DG, entry, head_counts, removed)
    return {"removed_weights": float(removed), "groups": float(len(groups))}


def _recorded_shapes(model: nn.Module) -> dict[nn.Module, tuple]:
    """Layers with a recorded state: their matrix shape and kernel size."""
    return {
        m: (tuple(weight_matrix(m).shape), kernel_area(m))
        for m in model.modules()
        if is_compressible(m) and get_state(m) is not None
    }


def _prune_groups(
    model: nn.Module, graph: Any, groups: list, counted: set[str], shapes: dict
) -> int:
    """Prune ``groups`` (every check first), slice the recorded states of the shrunk layers,
    and return the counted weights removed."""
    before = _counted_weights(model, counted)
    out_channel_fn = graph.is_out_channel_pruning_fn
    for group in groups:  # every check before anything changes
        for item in group:
            module = item.dep.target.module
            if module in shapes and not out_channel_fn(item.dep.handler):
                check_columns_removable(module)
            if isinstance(module, nn.MultiheadAttention):
                _check_projections_dense(module)
    for group in groups:
        recorded = [
            (item.dep.target.module, out_channel_fn(item.dep.handler), list(item.idxs))
            for item in group
            if item.dep.target.module in shapes
        ]
        group.prune()
        for module, out_channel, pruned in recorded:
            _slice_recorded(module, out_channel, pruned, shapes[module])
            shapes[module] = (tuple(weight_matrix(module).shape), kernel_area(module))
    return before - _counted_weights(model, counted)


def _check_projections_dense(attention: nn.MultiheadAttention) -> None:
    """Refuse to prune the channels of an attention whose query/key/value projections carry a
    compression state: their recorded masks and grids are not sliced with ``in_proj_weight``.

    Raises:
        PPQConfigError: naming the projection, its stages and the fix.
    """
    for name in PROJECTIONS:
        view = getattr(attention, name, None)
        state = get_state(getattr(view, "base_layer", view)) if view is not None else None
        if state is not None:
            raise PPQConfigError(
                f"channel pruning would shrink the {name} of an nn.MultiheadAttention that stages "
                f"{state.stages} already compressed (its mask and grid are recorded on the rows "
                "of in_proj_weight, and are not sliced with them): prune channels before those "
                "stages, or list the attention's layers in their `ignore`."
            )


def _record(
    model: nn.Module,
    example: Tensor,
    graph: Any,
    entry: HistoryEntry,
    head_counts: dict[str, int],
    removed: int,
) -> None:
    record_stage(
        model,
        {
            **entry,
            "edit": DEPGRAPH_PRUNING,
            "input_shape": [1, *example.shape[1:]],
            "pruning_history": graph.pruning_history(),
            "num_heads": head_counts,
            "removed_weights": removed,
        },
    )


def prune_chosen_channels(
    model: nn.Module,
    example: Tensor,
    graph: Any,
    chosen: list[tuple[nn.Module, Any, list[int]]],
    entry: HistoryEntry,
) -> dict[str, float]:
    """Remove chosen channels of coupled groups and record the edit on ``model`` (as
    :func:`prune_channels` does), e.g. the groups a search picked from
    ``edits.channel_units.depgraph_units``.

    Args:
        model: the model ``graph`` was traced on.
        example: the input it was traced on.
        graph: Torch-Pruning's ``DependencyGraph`` of ``model``.
        chosen: ``(root module, root pruning function, channels to remove)`` per group.
        entry: the stage's history entry.

    Raises:
        PPQConfigError: when a layer quantized with input groups would lose input channels
            (nothing is changed then).
    """
    counted = set(counted_layers(model))
    groups = [graph.get_pruning_group(m, fn, idxs) for m, fn, idxs in chosen if idxs]
    removed = _prune_groups(model, graph, groups, counted, _recorded_shapes(model))
    _record(model, example, graph, entry, {}, removed)
    return {"removed_weights": float(removed), "groups": float(len(groups))}


def replay_depgraph(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Prune a fresh ``model`` (its module ``owner``) as the recorded pruning did."""
    import torch_pruning as tp

    target = model.get_submodule(owner)
    parameter = next(target.parameters())
    example = torch.zeros(entry["input_shape"], dtype=parameter.dtype, device=parameter.device)
    with torch.enable_grad(), projection_views_hidden(target):  # traced as in prune_channels
        graph = tp.DependencyGraph().build_dependency(target, example, verbose=False)
    graph.load_pruning_history(entry["pruning_history"])
    for name, count in entry.get("num_heads", {}).items():
        _give_heads(target.get_submodule(name), count)
