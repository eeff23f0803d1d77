"""Module views: which layers compress and how they read as matrices, choosing them by name,
replacing them, weight transforms active during training, per-layer bit widths, and
``nn.MultiheadAttention``'s projections as linear layers."""

from ppq_lightning.modules.attention import AttentionProjection, install_projection_views
from ppq_lightning.modules.mixed_precision import assign_bits
from ppq_lightning.modules.targets import compile_patterns, resolve_targets
from ppq_lightning.modules.transforms import attach_weight_transform, detach_weight_transform
from ppq_lightning.modules.tree import find_module, parent_of, replace_module
from ppq_lightning.modules.views import (
    as_matrix,
    input_rows,
    is_compressible,
    set_weight_matrix,
    to_weight_layout,
    weight_matrix,
)

__all__ = [
    "AttentionProjection",
    "as_matrix",
    "assign_bits",
    "attach_weight_transform",
    "compile_patterns",
    "detach_weight_transform",
    "find_module",
    "input_rows",
    "install_projection_views",
    "is_compressible",
    "parent_of",
    "replace_module",
    "resolve_targets",
    "set_weight_matrix",
    "to_weight_layout",
    "weight_matrix",
]
