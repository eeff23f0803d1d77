"""The table of structural edits: each edit kind recorded in a history entry (``"edit"``) maps
to the function that replays it on a fresh model, as peft maps its method types to classes.

A replay function takes ``(model, owner, entry)``: the model being loaded into, the name of the
module the entry is recorded on (relative to ``model``), and the entry. An edit that creates
the module it is recorded on (kept LoRA adapters are recorded on ``...q_proj.base_layer``,
which a fresh model lacks) says so; any other edit whose module is missing is left to
``load_state_dict`` to report. New kinds (the vision edits, say) are added with
:func:`register_edit`, called explicitly by the module that defines them; nothing is
registered as a side effect of an import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.edits.batchnorm import FOLDED_BATCHNORM, replay_fold
from ppq_lightning.edits.blocks import BLOCK_REMOVAL, replay_block_removal
from ppq_lightning.edits.channels import (
    KEPT_COLUMNS,
    KEPT_ROWS,
    replay_kept_columns,
    replay_kept_rows,
)
from ppq_lightning.edits.depgraph import DEPGRAPH_PRUNING, replay_depgraph
from ppq_lightning.edits.lora import LORA_ADAPTERS, LORA_METHOD, replay_lora_adapter
from ppq_lightning.edits.sharing import SHARED_BASIS, replay_shared_basis
from ppq_lightning.errors import PPQConfigError

Replay = Callable[[nn.Module, str, HistoryEntry], None]


class Edit(NamedTuple):
    """How one kind of structural edit is replayed.

    Attributes:
        replay: ``(model, owner, entry) -> None``, rebuilding the edit on a fresh model.
        creates_owner: the replay creates the module the entry is recorded on.
    """

    replay: Replay
    creates_owner: bool = False


EDITS: dict[str, Edit] = {
    BLOCK_REMOVAL: Edit(replay_block_removal),
    KEPT_ROWS: Edit(replay_kept_rows),
    KEPT_COLUMNS: Edit(replay_kept_columns),
    SHARED_BASIS: Edit(replay_shared_basis),
    LORA_ADAPTERS: Edit(replay_lora_adapter, creates_owner=True),
    FOLDED_BATCHNORM: Edit(replay_fold),
    DEPGRAPH_PRUNING: Edit(replay_depgraph),
}
"""Edit kind -> how to replay it."""


def describe(replay: Replay) -> str:
    """A replay function's name, for messages (any callable)."""
    return getattr(replay, "__qualname__", None) or repr(replay)


def register_edit(
    kind: str, replay: Replay, creates_owner: bool = False, replace: bool = False
) -> None:
    """Add an edit kind to :data:`EDITS`.

    Args:
        kind: the name recorded as ``entry["edit"]``.
        replay: ``(model, owner, entry) -> None``, rebuilding the edit on a fresh model.
        creates_owner: the replay creates the module the entry is recorded on.
        replace: allow replacing an existing kind's replay.

    Raises:
        PPQConfigError: when ``kind`` is not a non-empty string, or is taken and ``replace`` is
            False.
    """
    if not isinstance(kind, str) or not kind:
        raise PPQConfigError(f"kind={kind!r} is not allowed: expected a non-empty string.")
    edit = Edit(replay, creates_owner)
    if kind in EDITS and not replace and EDITS[kind] != edit:
        raise PPQConfigError(
            f"edit kind {kind!r} is already registered ({describe(EDITS[kind].replay)}); "
            "pass replace=True to replace it."
        )
    EDITS[kind] = edit


def edit_kind(entry: HistoryEntry) -> str | None:
    """The structural edit an entry records, or None.

    Entries written before edits were named (no ``"edit"`` key) are recognised by their keys:
    ``container`` + ``removed`` (block removal), ``kept_rows``, ``kept_cols``,
    ``shared_basis``, and a LoRAFineTune entry with ``adapter_weights`` (kept adapters).
    """
    if "edit" in entry:
        return entry["edit"]
    if "removed" in entry and "container" in entry:
        return BLOCK_REMOVAL
    if "kept_rows" in entry:
        return KEPT_ROWS
    if "kept_cols" in entry:
        return KEPT_COLUMNS
    if SHARED_BASIS in entry:
        return SHARED_BASIS
    if entry.get("method") == LORA_METHOD and "adapter_weights" in entry:
        return LORA_ADAPTERS
    return None


def replay_entry(model: nn.Module, owner: str, entry: HistoryEntry, exists: bool = True) -> None:
    """Replay the structural edit ``entry`` records (if any) on the module ``owner`` of ``model``.

    Args:
        model: the model being loaded into.
        owner: the module the entry is recorded on.
        entry: the history entry.
        exists: whether ``owner`` is in ``model`` (when not, only an edit that creates it runs).

    Raises:
        PPQConfigError: for an edit kind that is not registered.
    """
    kind = edit_kind(entry)
    if kind is None:
        return
    if kind not in EDITS:
        raise PPQConfigError(
            f"{owner}: the state records the edit {kind!r} of stage {entry.get('stage')!r}, "
            f"which this version cannot replay; known edits: {', '.join(sorted(EDITS))}."
        )
    if exists or EDITS[kind].creates_owner:
        EDITS[kind].replay(model, owner, entry)
