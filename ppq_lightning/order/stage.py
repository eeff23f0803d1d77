"""What the order science needs of a compression stage, whatever implements it.

Studies and schedules are written against :class:`Stage`, so that the core never imports the
Lightning callbacks that implement it (``ppq_lightning.callbacks.CompressionCallback`` does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ppq_lightning.compressed.history import StageKind


@runtime_checkable
class Stage(Protocol):
    """A named compression stage that can be applied to a model at once.

    Attributes:
        name: what the stage is called in orders, logs and reports (``"P"``, ``"gptq"``).
        identity: what the stage computes: its method and every argument that can change the
            weights it produces, never its name (a cell of a study is keyed by its stages'
            identities).
        state_key: the stage in a run: its identity and, when given, its name (recorded on
            every module it touches).
        kind: what the stage does (:class:`~ppq_lightning.compressed.history.StageKind`).
        b_orig: bits of an original weight, for compression rates.
    """

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str: ...

    @property
    def state_key(self) -> str: ...

    @property
    def kind(self) -> StageKind: ...

    @property
    def b_orig(self) -> int: ...

    def apply(
        self,
        model: nn.Module,
        trainer: Any = None,
        index: int = 1,
        dataloader: Iterable[Any] | None = None,
    ) -> Any:
        """Compress ``model`` in place (``dataloader``: calibration data)."""
        ...
