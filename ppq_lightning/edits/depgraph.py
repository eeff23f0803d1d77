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

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.accounting import counted_layers
from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.edits.channels import check_columns_removable, slice_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.attention import projection_views_hidden
from ppq_lightning.modules.produced import ProducedBy
from ppq_lightning.modules.views import (
    is_compressible,
    is_convolution,
    is_grouped_convolution,
    weight_matrix,
)

DEPGRAPH_PRUNING = "depgraph_channels"

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments a model is traced with (``calibration.capture.
example_call``: the call the stage's forward makes)."""
_SCALARS = (bool, int, float, str, type(None))


def as_call(example: Tensor | Call) -> Call:
    """``example`` as ``(args, kwargs)``: a tensor is the model's one positional input."""
    if isinstance(example, Tensor):
        return (example,), {}
    return tuple(example[0]), dict(example[1])


def call_model(model: nn.Module, example: Tensor | Call) -> Any:
    """``model`` called on ``example`` (Torch-Pruning's ``forward_fn`` for a traced call)."""
    args, kwargs = as_call(example)
    return model(*args, **kwargs)


def output_tensors(output: Any) -> list[Tensor]:
    """The tensors of a model's output (a tensor, a dict or an HF ``ModelOutput``, lists and
    tuples of them), the rest (a key/value cache) left out: what Torch-Pruning traces back."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in output_tensors(item)]
    return []


def trace_graph(model: nn.Module, example: Tensor | Call) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model``, traced on the call ``example`` (with
    the views of attention projections taken out: Torch-Pruning prunes the attention itself)."""
    import torch_pruning as tp

    with torch.enable_grad(), projection_views_hidden(model):
        return tp.DependencyGraph().build_dependency(
            model,
            as_call(example),
            forward_fn=call_model,
            output_transform=output_tensors,
            verbose=False,
        )


def output_layers(model: nn.Module, example: Tensor | Call) -> list[nn.Module]:
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
            output = call_model(model, example)
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


def attention_layers(model: nn.Module) -> set[nn.Module]:
    """The layers whose output features an attention splits into heads: every
    ``nn.MultiheadAttention`` and the linear and conv children of a module with an integer
    ``head_dim`` (timm's ``qkv``/``proj``, an HF attention's ``q/k/v/o_proj``), whose forward
    reshapes their outputs by its head count and head size."""
    layers: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            layers.add(module)
        elif isinstance(getattr(module, "head_dim", None), int):
            layers.update(
                child
                for child in module.children()
                if isinstance(child, nn.Linear) or is_convolution(child)
            )
    return layers


def keeps_attention(group: Any, graph: Any, attention: set[nn.Module], heads: set) -> bool:
    """Whether pruning ``group`` leaves every attention as its forward reads it: the group
    removes no embedding channel of an ``nn.MultiheadAttention`` (Torch-Pruning removes the same
    indices from each head's query/key/value features, and the model around it reads the width:
    torchvision's ``VisionTransformer.hidden_dim``, ``nn.Transformer``'s ``d_model``) and no
    output feature of a layer in ``attention`` (see :func:`attention_layers`) but the fused
    projections in ``heads``, whose whole heads ``prune_heads`` removes."""
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.MultiheadAttention):
            return False
        if (
            module in attention
            and module not in heads
            and graph.is_out_channel_pruning_fn(item.dep.handler)
        ):
            return False
    return True


def _counted_weights(model: nn.Module, names: set[str]) -> int:
    """Weights of the layers ``names`` (those the compression rate counts)."""
    return sum(m.weight.numel() for n, m in model.named_modules() if n in names)


def kernel_area(module: nn.Module) -> int:
    """Weight-matrix columns per input channel: the kernel's size of a convolution (``kh * kw``
    of a ``Conv2d``, ``k`` of a ``Conv1d``), 1 of a linear layer."""
    return math.prod(module.kernel_size) if is_convolution(module) else 1


def _kept(size: int, pruned: list[int]) -> Tensor:
    drop = set(pruned)
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


def _slice_recorded(module: nn.Module, out_channel: bool, pruned: list[int], before: tuple) -> None:
    """Slice the recorded mask and grid of a layer Torch-Pruning just shrank (``before``: its
    weight matrix shape and, for a conv, its kernel size before pruning). A depthwise conv's
    channels are its rows whichever side is pruned."""
    rows, cols = before[0]
    if out_channel or is_grouped_convolution(module):
        slice_state(module, _kept(rows, pruned), None)
        return
    kernel = before[1]
    channels = _kept(cols // kernel, pruned)  # input channels kept
    columns = (channels[:, None] * kernel + torch.arange(kernel)).flatten()
    slice_state(module, None, columns)


def prune_channels(
    model: nn.Module,
    example: Tensor | Call,
    ratio: float,
    ignored: list[nn.Module],
    entry: HistoryEntry,
    prune_heads: bool = False,
    round_to: int | None = None,
) -> dict[str, float]:
    """Remove ``ratio`` of the channels of every prunable group of ``model`` (smallest group
    L2 norm first), record the edit on ``model``, and return what was removed.

    Groups that would change an attention's layout are left whole (:func:`keeps_attention`):
    an ``nn.MultiheadAttention``'s embedding dimension (a transformer's residual stream) and
    the query/key/value/output features of attention modules, but for whole heads with
    ``prune_heads``. In a transformer that prunes the MLPs' hidden channels.

    Args:
        model: the model (its forward is traced once on ``example``).
        example: an input batch (one sample is enough), or the ``(args, kwargs)`` the model is
            called with (``calibration.capture.example_call``).
        ratio: fraction of each group's channels (or, with ``prune_heads``, of each attention
            module's heads) to remove, in [0, 1).
        ignored: modules whose output channels are never pruned (the classifier).
        entry: the stage's history entry.
        prune_heads: prune whole attention heads of timm ViTs.
        round_to: keep channel counts multiples of this (hardware-friendly widths).

    Raises:
        PPQConfigError: when a layer quantized with input groups would lose input channels, or
            an argument of ``example`` is neither a tensor nor a scalar (it cannot be recorded
            for the replay); nothing is changed then.
    """
    _describe(example)  # checked before anything changes
    with torch.enable_grad():  # Torch-Pruning traces the forward through autograd
        return _prune_channels(model, example, ratio, ignored, entry, prune_heads, round_to)


def _prune_channels(
    model: nn.Module,
    example: Tensor | Call,
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
            as_call(example),
            forward_fn=call_model,
            output_transform=output_tensors,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=heads,
            prune_num_heads=bool(heads),
            prune_head_dims=not heads,
            head_pruning_ratio=ratio if heads else 0.0,
            round_to=round_to,
        )
    attention = attention_layers(model)
    groups = [
        group
        for group in pruner.step(interactive=True)
        if keeps_attention(group, pruner.DG, attention, set(heads))
    ]
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


def _describe(example: Tensor | Call) -> dict[str, Any]:
    """What the replay rebuilds ``example`` from: each tensor argument's shape (batch of one)
    and dtype, the scalar arguments as they are.

    Raises:
        PPQConfigError: an argument neither a tensor nor a scalar.
    """
    args, kwargs = as_call(example)

    def one(name: str, value: Any) -> Any:
        if isinstance(value, Tensor):
            shape = [1, *value.shape[1:]] if value.dim() else []
            return {"shape": shape, "dtype": str(value.dtype).removeprefix("torch.")}
        if isinstance(value, _SCALARS):
            return value
        raise PPQConfigError(
            f"DepGraph pruning traces the model's call, whose argument {name} is a "
            f"{type(value).__name__}: the edit records each argument (tensors and scalars) to "
            "replay the pruning on a fresh model; pass the stage a forward_fn that calls the "
            "model on tensors and scalars."
        )

    return {
        "args": [one(f"#{i}", value) for i, value in enumerate(args)],
        "kwargs": {key: one(key, value) for key, value in kwargs.items()},
    }


def _rebuild(recorded: Any, parameter: Tensor) -> Any:
    """A recorded argument: zeros of its shape (floating ones in the model's dtype)."""
    if not isinstance(recorded, Mapping):
        return recorded
    dtype = getattr(torch, recorded["dtype"])
    dtype = parameter.dtype if dtype.is_floating_point else dtype
    return torch.zeros(recorded["shape"], dtype=dtype, device=parameter.device)


def _replay_call(entry: HistoryEntry, parameter: Tensor) -> Call:
    """The call a recorded pruning traced (older records: one input of ``input_shape``)."""
    if "example" not in entry:
        shape = entry["input_shape"]
        return (torch.zeros(shape, dtype=parameter.dtype, device=parameter.device),), {}
    recorded = entry["example"]
    args = tuple(_rebuild(value, parameter) for value in recorded["args"])
    return args, {key: _rebuild(value, parameter) for key, value in recorded["kwargs"].items()}


def _record(
    model: nn.Module,
    example: Tensor | Call,
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
            "example": _describe(example),
            "pruning_history": graph.pruning_history(),
            "num_heads": head_counts,
            "removed_weights": removed,
        },
    )


def prune_chosen_channels(
    model: nn.Module,
    example: Tensor | Call,
    graph: Any,
    chosen: list[tuple[nn.Module, Any, list[int]]],
    entry: HistoryEntry,
) -> dict[str, float]:
    """Remove chosen channels of coupled groups and record the edit on ``model`` (as
    :func:`prune_channels` does), e.g. the groups a search picked from
    ``edits.channel_units.depgraph_units``.

    Args:
        model: the model ``graph`` was traced on.
        example: the input (or ``(args, kwargs)``) it was traced on.
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
    target = model.get_submodule(owner)
    graph = trace_graph(target, _replay_call(entry, next(target.parameters())))
    graph.load_pruning_history(entry["pruning_history"])
    for name, count in entry.get("num_heads", {}).items():
        _give_heads(target.get_submodule(name), count)
