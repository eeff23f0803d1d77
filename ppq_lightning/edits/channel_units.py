"""Units of structured channels that a search can remove a share of, and what each share
removes: the matrix rows and columns of every layer it touches (``JointStructuralMixedPrecision``).

Two kinds of unit:

- an **MLP** of a transformer (gate/up/down, fc1/fc2, c_fc/c_proj): its intermediate channels,
  ranked by ``E[x_j^2] ||W_out[:, j]||^2``; a share removes rows of the input projections and
  columns of the output projection (``edits.channels``);
- a **coupled group** of a CNN (or of a ViT's MLP) from Torch-Pruning's dependency graph: a
  convolution's output channels with their BatchNorm channels, the input channels of every layer
  reading them and, through residual additions, the coupled channels of other layers; ranked by
  the group's L2 norm (as ``DepGraphPruning``); a share removes the rows of the producers and the
  columns of the consumers (``edits.depgraph``).

A removed channel's function is *exactly* that of its consumers' columns set to zero (nothing
else reads it), which is how a search emulates a share without editing the model. Groups for
which that does not hold are left out: those through a normalisation over channels (LayerNorm,
GroupNorm: removing a channel changes the statistics of the others), through attention
(``qkv``: removing head dimensions changes the scores), or through grouped, non-depthwise
convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.edits.channels import mlp_inputs
from ppq_lightning.edits.depgraph import Call, kernel_area, trace_graph
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import is_convolution, is_grouped_convolution
from ppq_lightning.ops.channels import keep_most_important

# layer name -> (removed matrix rows, removed matrix columns)
Removal = dict[str, tuple[Tensor, Tensor]]
_EMPTY = torch.zeros(0, dtype=torch.long)


@dataclass
class ChannelUnit:
    """One unit of channels and what each of its kept shares removes.

    Attributes:
        name: the unit's key in a search (``keep:<layer or root>``).
        channels: how many channels the unit has.
        scores: each channel's importance (the ranking ``removed`` follows).
        removed: per kept share (level), the removed channels, least important first removed.
        layers: per level, the matrix rows and columns each touched layer loses.
        root: for a coupled group, the Torch-Pruning root ``(module, pruning function)``.
    """

    name: str
    channels: int
    scores: Tensor
    removed: list[Tensor]
    layers: list[Removal]
    root: tuple[nn.Module, Callable] | None = field(default=None, repr=False)


def _removed(scores: Tensor, keep: list[float]) -> list[Tensor]:
    """The removed channel indices at each kept share (the least important ones)."""
    out = []
    for share in keep:
        kept = keep_most_important(scores, 1 - share)
        mask = torch.ones(scores.numel(), dtype=torch.bool)
        mask[kept] = False
        out.append(mask.nonzero().flatten())
    return out


def mlp_units(
    model: nn.Module, downs: list[str], scores: dict[str, Tensor], keep: list[float]
) -> list[ChannelUnit]:
    """One unit per MLP output projection ``downs`` (names in ``model``), ranked by ``scores``
    (one per intermediate channel)."""
    units = []
    for down in downs:
        parent, attribute = parent_of(model, down)
        prefix = down.rpartition(".")[0]
        producers = [f"{prefix}.{i}" for i in mlp_inputs(parent, attribute)]
        removed = _removed(scores[down], keep)
        layers = [
            {down: (_EMPTY, r)} | {p: (r, _EMPTY) for p in producers} if r.numel() else {}
            for r in removed
        ]
        units.append(
            ChannelUnit(f"keep:{down}", scores[down].numel(), scores[down], removed, layers)
        )
    return units


_EXACT_TYPES = (nn.Linear, nn.modules.batchnorm._BatchNorm)


def _is_operation(module: nn.Module) -> bool:
    """Torch-Pruning's nodes for additions, concatenations, reshapes (not a layer)."""
    return type(module).__module__.startswith("torch_pruning.ops")


def _exact_group(group: Any, heads: set[nn.Module]) -> bool:
    """Whether removing the group's channels equals zeroing its consumers' columns: every
    member is a dense or depthwise convolution, a linear layer, a BatchNorm or one of
    Torch-Pruning's operation nodes (additions, concatenations, reshapes)."""
    for item in group:
        module = item.dep.target.module
        if module in heads:
            return False
        if is_convolution(module):
            depthwise = module.groups == module.in_channels == module.out_channels
            if module.groups != 1 and not depthwise:
                return False
        elif not isinstance(module, _EXACT_TYPES) and not _is_operation(module):
            return False
    return True


def _group_removal(graph: Any, group: Any, names: dict[nn.Module, str]) -> Removal:
    """The rows and columns of every weight layer that pruning ``group`` removes."""
    rows: dict[str, list[Tensor]] = {}
    cols: dict[str, list[Tensor]] = {}
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.Linear) and not is_convolution(module):
            continue
        name, idxs = names[module], torch.tensor(list(item.idxs), dtype=torch.long)
        depthwise = is_grouped_convolution(module)
        if graph.is_out_channel_pruning_fn(item.dep.handler) or depthwise:
            rows.setdefault(name, []).append(idxs)
        else:
            kernel = kernel_area(module)
            cols.setdefault(name, []).append(
                (idxs[:, None] * kernel + torch.arange(kernel)).flatten()
            )
    return {
        n: (
            torch.unique(torch.cat(rows[n])) if n in rows else _EMPTY,
            torch.unique(torch.cat(cols[n])) if n in cols else _EMPTY,
        )
        for n in {*rows, *cols}
    }


def depgraph_units(
    model: nn.Module,
    example: Tensor | Call,
    ignored: list[nn.Module],
    keep: list[float],
    heads: set[nn.Module] | None = None,
) -> tuple[list[ChannelUnit], Any]:
    """One unit per coupled channel group of ``model`` that can be emulated exactly, and the
    dependency graph they come from (traced once on ``example``).

    Args:
        model: the model; layer names are relative to it.
        example: an input batch (one sample is enough), or the ``(args, kwargs)`` the model is
            called with (``calibration.capture.example_call``).
        ignored: modules whose output channels are never pruned (the classifier, the stem).
        keep: the kept shares, 1.0 first.
        heads: fused attention projections (never in a unit).
    """
    import torch_pruning as tp

    graph = trace_graph(model, example)  # as edits.depgraph traces it
    names = {m: n for n, m in model.named_modules()}
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    units = []
    for group in graph.get_all_groups(ignored_layers=ignored):
        if not _exact_group(group, heads or set()):
            continue
        root = group[0].dep
        scores = importance(group).detach().float().cpu()
        removed = _removed(scores, keep)
        layers = []
        for r in removed:
            pruned = graph.get_pruning_group(root.target.module, root.handler, r.tolist())
            layers.append(_group_removal(graph, pruned, names) if r.numel() else {})
        name = f"keep:{names[root.target.module]}"
        units.append(
            ChannelUnit(
                name, scores.numel(), scores, removed, layers, (root.target.module, root.handler)
            )
        )
    return units, graph
