"""ppq-lightning: compression order as a first-class variable, on PyTorch Lightning."""

from ppq_lightning.errors import InvariantError, PPQConfigError
from ppq_lightning.metrics import (
    compression_summary,
    nominal_compression_rate,
    order_advantage,
    performance_gap,
)
from ppq_lightning.state import check_invariants

__all__ = [
    "InvariantError",
    "PPQConfigError",
    "check_invariants",
    "compression_summary",
    "nominal_compression_rate",
    "order_advantage",
    "performance_gap",
]
__version__ = "0.1.0"
