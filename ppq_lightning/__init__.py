"""ppq-lightning: compression order as a first-class variable, on PyTorch Lightning.

The packages, from the bottom layer up (each imports only those below it):
``ops`` (tensor math) -> ``modules`` (layer views, targets) -> ``compressed`` (state,
invariants, accounting) -> ``calibration`` (the layer-wise engine) -> ``edits`` (structural
edits and their replay) -> ``order`` (grammar, metrics, prediction) -> ``study`` (order
studies, sweeps) -> ``models`` (LightningModules, loading) -> ``callbacks`` / ``datamodules``
-> ``cli``. See docs/architecture.md.
"""

from ppq_lightning.compressed.accounting import compression_summary, nominal_compression_rate
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.errors import InvariantError, PPQConfigError
from ppq_lightning.order.metrics import order_advantage, performance_gap

__all__ = [
    "InvariantError",
    "PPQConfigError",
    "check_invariants",
    "compression_summary",
    "export",
    "nominal_compression_rate",
    "order_advantage",
    "performance_gap",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # PEP 562: the callable export package, imported lazily
    if name == "export":
        import importlib

        return importlib.import_module("ppq_lightning.export")
    raise AttributeError(f"module 'ppq_lightning' has no attribute {name!r}")
