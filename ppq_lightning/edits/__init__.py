"""Structural edits (removed blocks, channels and heads, shared bases, LoRA adapters), the table
that replays them by kind, and the loading of a compressed state dict into a fresh model."""

from ppq_lightning.edits.blocks import remove_blocks
from ppq_lightning.edits.channels import select_columns, select_rows
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.lora import ADAPTER, lora_layers
from ppq_lightning.edits.registry import EDITS, edit_kind, register_edit
from ppq_lightning.edits.sharing import SharedBasisLinear

__all__ = [
    "ADAPTER",
    "EDITS",
    "SharedBasisLinear",
    "edit_kind",
    "enable_state_loading",
    "lora_layers",
    "register_edit",
    "remove_blocks",
    "select_columns",
    "select_rows",
]
