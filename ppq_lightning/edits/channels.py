"""Removing channels and attention heads for good (the edits of ``ChannelPruning``).

A structured unit is removed from the layers that produce it (output rows) and from the layer
that consumes it (input columns): an MLP intermediate channel from ``gate_proj``/``up_proj``
rows and ``down_proj`` columns (``fc1``/``fc2`` in OPT, ``c_fc``/``c_proj`` in GPT-2), a
key/value group of attention heads from ``q_proj``/``k_proj``/``v_proj`` rows and ``o_proj``
columns. Each shrunk layer records the rows or columns it kept, so that a fresh model is
shrunk the same way before a state dict of the pruned model is loaded into it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.edits.sharing import SharedBasisLinear
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import (
    as_matrix,
    matrix_to_layout,
    set_features,
    to_weight_layout,
    weight_matrix,
)
from ppq_lightning.ops.channels import keep_most_important, kv_group_rows
from ppq_lightning.ops.float_grid import FloatGrid

KEPT_ROWS, KEPT_COLUMNS = "select_rows", "select_columns"
# (input projections, output projection), by attribute name on the same parent module
MLP_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("c_fc",), "c_proj"))
HEAD_LAYOUT = (("q_proj",), ("k_proj", "v_proj"), "o_proj")
STRUCTURES = ("mlp", "heads", "both")


class ChannelEdit(NamedTuple):
    """Keep only ``index`` of the ``axis`` (``"rows"`` or ``"cols"``) of layer ``attribute``."""

    attribute: str
    axis: str
    index: Tensor


# -- shrinking one layer ----------------------------------------------------------------------
def check_columns_removable(module: nn.Module) -> None:
    state = get_state(module)
    if state is not None and state.grid is not None and state.group_size is not None:
        raise PPQConfigError(
            "channel pruning cannot remove input columns of a layer quantized with "
            f"group_size={state.group_size} (format {state.grid_format}): prune channels before "
            "quantizing, or quantize per channel."
        )


def check_rows_removable(module: nn.Module) -> None:
    state = get_state(module)
    if state is not None and state.grid_format == "fp8_block":
        raise PPQConfigError(
            "channel pruning cannot remove output rows of a layer quantized with fp8_block "
            "(one scale per 128 x 128 block): prune channels before quantizing."
        )


def slice_state(module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
    """Slice the recorded mask and grid of a layer whose weight was just sliced."""
    state = get_state(module)
    if state is None:
        return
    if state.mask is not None:
        mask = as_matrix(module, state.mask)  # (out, in) of the weight before slicing
        mask = mask[rows] if rows is not None else mask
        mask = mask[:, cols] if cols is not None else mask
        state.mask = to_weight_layout(module, mask)  # the layout of the sliced weight
    grid = state.grid
    if grid is not None and (rows is not None or cols is not None):
        grid = grid.select_rows(rows) if rows is not None else grid
        if isinstance(grid, FloatGrid):  # a per-row FP8 grid of fewer columns
            grid = FloatGrid(
                grid.scale, grid.global_scale, grid.format, tuple(weight_matrix(module).shape)
            )
        state.set_grid(grid, module.weight.device)


def select_rows(module: nn.Module, rows: Tensor) -> None:
    """Keep only the output rows ``rows`` of a layer (its weight matrix, bias, recorded state)."""
    check_rows_removable(module)
    matrix = weight_matrix(module)[rows].clone()  # (kept, in)
    module.weight = nn.Parameter(
        matrix_to_layout(module, matrix), requires_grad=module.weight.requires_grad
    )
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(
            module.bias.data[rows].clone(), requires_grad=module.bias.requires_grad
        )
    set_features(module)
    slice_state(module, rows, None)


def select_columns(module: nn.Module, cols: Tensor) -> None:
    """Keep only the input columns ``cols`` of a layer (weight matrix and recorded state).

    Raises:
        PPQConfigError: when the layer is quantized with groups (a group would lose columns);
            nothing is changed then.
    """
    check_columns_removable(module)
    matrix = weight_matrix(module)[:, cols].clone()  # (out, kept)
    module.weight = nn.Parameter(
        matrix_to_layout(module, matrix), requires_grad=module.weight.requires_grad
    )
    set_features(module)
    slice_state(module, None, cols)


# -- which layers form a structure ------------------------------------------------------------
def mlp_inputs(parent: nn.Module, out_name: str) -> tuple[str, ...] | None:
    """The input projections of the MLP whose output projection is ``parent.<out_name>``."""
    for inputs, output in MLP_LAYOUTS:
        if out_name == output and all(hasattr(parent, n) for n in inputs):
            return inputs
    return None


def is_attention_output(parent: nn.Module, attribute: str) -> bool:
    """Whether ``parent.<attribute>`` is the output projection of a q/k/v/o attention module
    with a ``head_dim`` (Llama, Mistral, Qwen2)."""
    return (
        attribute == HEAD_LAYOUT[2]
        and all(hasattr(parent, n) for n in (*HEAD_LAYOUT[0], *HEAD_LAYOUT[1]))
        and hasattr(parent, "head_dim")
    )


def shrunk_attributes(structure: str) -> set[str]:
    """Attribute names of the layers a ``structure`` shrinks (inputs and outputs)."""
    names: set[str] = set()
    if structure in ("mlp", "both"):
        for inputs, output in MLP_LAYOUTS:
            names.update((*inputs, output))
    if structure in ("heads", "both"):
        names.update((*HEAD_LAYOUT[0], *HEAD_LAYOUT[1], HEAD_LAYOUT[2]))
    return names


def output_projections(
    model: nn.Module, modules: dict[str, nn.Module], structure: str
) -> dict[str, nn.Module]:
    """The output projections among ``modules`` whose input channels ``structure`` prunes.

    Raises:
        PPQConfigError: when a layer of the structure is factorised by basis sharing, or none
            of the known layouts is among ``modules``.
    """
    shrunk = shrunk_attributes(structure)
    shared = sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, SharedBasisLinear) and name.rpartition(".")[2] in shrunk
    )
    if shared:
        raise PPQConfigError(
            f"ChannelPruning(structure={structure!r}) cannot shrink {shared[:4]}"
            f"{' ...' if len(shared) > 4 else ''}: BasisSharing factorised them, and a basis "
            "shared across blocks has one set of input channels for all its blocks (nor can "
            "sharing come after: it factorises dense weights only). Share and prune different "
            "projections: e.g. BasisSharing(projections=['q_proj', 'k_proj', 'v_proj']) with "
            "ChannelPruning(structure='mlp')."
        )
    chosen = {}
    for name, module in modules.items():
        parent, attribute = parent_of(model, name)
        mlp = structure in ("mlp", "both") and mlp_inputs(parent, attribute) is not None
        heads = structure in ("heads", "both") and is_attention_output(parent, attribute)
        if mlp or heads:
            chosen[name] = module
    if not chosen:
        raise PPQConfigError(
            f"ChannelPruning(structure={structure!r}) found no known MLP (gate/up/down, "
            "fc1/fc2, c_fc/c_proj) or attention (q/k/v/o_proj) layout among the targets."
        )
    return chosen


def plan_channel_edits(
    parent: nn.Module, attribute: str, scores: Tensor, ratio: float
) -> list[ChannelEdit]:
    """The edits that remove a ``ratio`` of the least important input channels of the output
    projection ``parent.<attribute>`` (heads by whole key/value group), and of the rows that
    produce them.

    Args:
        parent: the module holding the projections (an MLP or attention module).
        attribute: the output projection's attribute on ``parent``.
        scores: importance of each input channel of the output projection, ``(in,)``.
        ratio: fraction of channels (or key/value groups) to remove, in [0, 1).
    """
    if attribute == HEAD_LAYOUT[2] and mlp_inputs(parent, attribute) is None:
        head_dim = parent.head_dim
        per_group = getattr(parent, "num_key_value_groups", 1) * head_dim
        kept = keep_most_important(scores, ratio, group=per_group)
        kv_kept = kv_group_rows(kept, per_group, head_dim)
        edits = [ChannelEdit(n, "rows", kept) for n in HEAD_LAYOUT[0]]
        edits += [ChannelEdit(n, "rows", kv_kept) for n in HEAD_LAYOUT[1]]
    else:
        kept = keep_most_important(scores, ratio)
        edits = [ChannelEdit(n, "rows", kept) for n in mlp_inputs(parent, attribute)]
    edits.append(ChannelEdit(attribute, "cols", kept))
    return edits


def apply_channel_edits(parent: nn.Module, edits: list[ChannelEdit], entry: HistoryEntry) -> None:
    """Shrink the layers of ``parent`` as ``edits`` say and record each edit (with the stage's
    ``entry``, the kept indices and the removed weights) on its layer."""
    for attribute, axis, index in edits:
        layer = getattr(parent, attribute)
        before = layer.weight.numel()
        (select_rows if axis == "rows" else select_columns)(layer, index)
        record_stage(
            layer,
            {
                **entry,
                "edit": KEPT_ROWS if axis == "rows" else KEPT_COLUMNS,
                f"kept_{axis}": index.tolist(),
                "removed_weights": before - layer.weight.numel(),
            },
        )


# -- replay on a fresh model ------------------------------------------------------------------
def replay_kept_rows(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Shrink the layer ``owner`` of a fresh ``model`` to the rows ``entry`` recorded."""
    select_rows(model.get_submodule(owner), torch.tensor(entry["kept_rows"]))


def replay_kept_columns(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Shrink the layer ``owner`` of a fresh ``model`` to the input columns ``entry`` recorded."""
    select_columns(model.get_submodule(owner), torch.tensor(entry["kept_cols"]))
