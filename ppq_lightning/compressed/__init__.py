"""The compressed state of a layer (mask, grid, history), its invariants, its upkeep while
training, and the accounting of nominal and measured compression rates."""

from ppq_lightning.compressed.accounting import (
    CompressionSummary,
    compression_summary,
    nominal_compression_rate,
)
from ppq_lightning.compressed.history import HistoryEntry, StageKind, kind_of
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.compressed.state import (
    STATE_NAME,
    CompressionState,
    applied_stages,
    compressed_modules,
    current_grid,
    current_mask,
    ensure_state,
    get_state,
    record_grid,
    record_mask,
    record_stage,
)
from ppq_lightning.compressed.upkeep import mask_gradients, project_onto_state

__all__ = [
    "STATE_NAME",
    "CompressionState",
    "CompressionSummary",
    "HistoryEntry",
    "StageKind",
    "applied_stages",
    "check_invariants",
    "compressed_modules",
    "compression_summary",
    "current_grid",
    "current_mask",
    "ensure_state",
    "get_state",
    "kind_of",
    "mask_gradients",
    "nominal_compression_rate",
    "project_onto_state",
    "record_grid",
    "record_mask",
    "record_stage",
]
