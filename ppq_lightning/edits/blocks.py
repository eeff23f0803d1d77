"""Removing whole blocks for good (the edit of ``BlockRemoval``), recorded and replayed.

The removal is recorded on the module holding the block container (``model.model`` of a HF
Llama), with the container's attribute and the removed indices, so that a fresh full-depth
model drops the same blocks before a state dict of the shrunk model is loaded into it.
"""

from __future__ import annotations

from torch import nn

from ppq_lightning.calibration.blocks import renumber_blocks, set_depth, subset_blocks
from ppq_lightning.compressed.accounting import original_weights
from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import is_compressible

BLOCK_REMOVAL = "remove_blocks"
# the HF config fields a removal changes, recorded as they were before it (``depth_config``):
# what an export's loader builds the original architecture from
DEPTH_CONFIG = ("num_hidden_layers", "n_layer", "num_layers", "layer_types")


def remove_blocks(model: nn.Module, name: str, indices: list[int]) -> int:
    """Delete the blocks ``indices`` of the container ``name`` for good.

    HF configs (``num_hidden_layers``, ``layer_types``) and the blocks' ``layer_idx`` are
    updated to the new depth.

    Returns:
        The number of original weights of the compressible layers removed (a layer shared with
        a kept block, such as a shared basis, stays and is not counted).
    """
    parent, attribute = parent_of(model, name)
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
    setattr(parent, attribute, subset_blocks(container, keep))
    set_depth(model, len(container), keep)
    renumber_blocks(getattr(parent, attribute))
    return removed


def remove_and_record(
    model: nn.Module, name: str, indices: list[int], entry: HistoryEntry
) -> HistoryEntry:
    """Remove the blocks ``indices`` of the container ``name`` and record the edit (with the
    stage's ``entry``) on the container's parent; returns the recorded entry."""
    configs = (m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict"))
    config = next(configs, None)
    depth = {f: getattr(config, f) for f in DEPTH_CONFIG if getattr(config, f, None) is not None}
    removed_weights = remove_blocks(model, name, indices)
    parent, attribute = parent_of(model, name)
    record: HistoryEntry = {
        **entry,
        "edit": BLOCK_REMOVAL,
        "container": attribute,
        "removed": list(indices),
        "removed_weights": removed_weights,
        "depth_config": depth,
    }
    record_stage(parent, record)
    return record


def replay_block_removal(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Remove from a fresh ``model`` the blocks that ``entry`` (recorded on ``owner``) removed."""
    container = f"{owner}.{entry['container']}" if owner else entry["container"]
    remove_blocks(model, container, entry["removed"])
