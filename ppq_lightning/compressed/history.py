"""What a stage records on every module it touches: the kind of stage and its history entry.

A history entry is a plain ``dict`` (it is saved as is in the module's extra state, so in every
checkpoint); :class:`HistoryEntry` names its keys and their types. Every entry has the stage's
``stage`` (its state key), ``method`` (the class name) and ``kind``, then the stage's arguments
(``sparsity``, ``bits``, ...), then what the accounting of C and the structural edits need.
"""

from __future__ import annotations

import enum
import sys
from typing import Any, TypedDict

from ppq_lightning.errors import PPQConfigError

if sys.version_info >= (3, 11):
    from typing import NotRequired
else:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired


class StageKind(str, enum.Enum):
    """What a stage does to the weights; its value is the letter used in orders and reports."""

    PRUNE = "P"
    QUANTIZE = "Q"
    PRUNE_QUANTIZE = "PQ"  # both at once (SparseGPT with bits, CoDeQ)
    SHARE = "S"
    LORA = "L"
    NORMALIZATION = "N"  # BatchNorm recalibration or folding: no weight is pruned or rounded

    @property
    def prunes(self) -> bool:
        """Whether the stage zeroes or removes weights."""
        return self in (StageKind.PRUNE, StageKind.PRUNE_QUANTIZE)

    @property
    def quantizes(self) -> bool:
        """Whether the stage puts weights on a grid."""
        return self in (StageKind.QUANTIZE, StageKind.PRUNE_QUANTIZE)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def kind_of(entry: dict[str, Any]) -> StageKind | None:
    """The :class:`StageKind` of a history entry (None for an entry without a known kind)."""
    try:
        return StageKind(entry.get("kind"))
    except ValueError:
        return None


class HistoryEntry(TypedDict):
    """One stage's record on one module (``CompressionState.history`` holds one per stage).

    Besides the keys below, an entry holds the stage's own arguments (``bits``, ``ratio``,
    ``r``, ...), as its ``stage_config()`` returns them.

    Keys:
        stage: the stage's state key (what identifies it on resume).
        method: the class of the stage, e.g. ``"GPTQ"``.
        kind: a :class:`StageKind` value.
        name: the stage's name (its ``name`` argument, else the method's default name), what
            orders and resumes call it; absent from records written before it was kept (the
            name is then read from ``stage``, see ``callbacks.stage.recorded_name``).
        sparsity, pattern: a pruning stage's target (CoDeQ: the learned sparsity).
        edit: the structural edit the entry records (``ppq_lightning.edits``), replayed when a
            fresh model loads the state.
        container, removed, depth_config: block removal: the container's attribute on the
            recording module, the removed block indices, and the HF config's depth fields as
            they were before (what rebuilds the original architecture).
        kept_rows, kept_cols: channel pruning: the rows / input columns the layer kept.
        shared_basis: basis sharing: what rebuilds the factorised layer.
        removed_weights: original weights the edit removed (stored in 0 bits).
        original_weights: original weights a factor stands for (basis sharing).
        adapter_weights: weights of unmerged LoRA adapters (stored at ``B_orig`` bits).
        mid_fit: ``{"epoch": e, "step": s}`` when the entry was completed from a checkpoint
            written while the stage trained (``edits.training``): the layer holds what the stage
            computed at that step (LoRA adapters unmerged; a fake-quantized weight on its grid),
            not what it would have recorded at the end of training.
    """

    stage: str
    method: str
    kind: str
    name: NotRequired[str]
    sparsity: NotRequired[float]
    pattern: NotRequired[str]
    edit: NotRequired[str]
    container: NotRequired[str]
    removed: NotRequired[list[int]]
    depth_config: NotRequired[dict[str, Any]]
    kept_rows: NotRequired[list[int]]
    kept_cols: NotRequired[list[int]]
    shared_basis: NotRequired[dict[str, Any]]
    removed_weights: NotRequired[int]
    original_weights: NotRequired[int]
    adapter_weights: NotRequired[int]
    mid_fit: NotRequired[dict[str, int]]


FIT_RECORD = "ppq_fit"
"""The state-dict key (at the saved module's prefix) of the :class:`FitRecord` that every state
dict taken during ``fit`` carries while a stage of the fit has not finished (a training stage
trains, a ramp ramps, a stage has not fired), so every checkpoint ``fit`` writes then."""

APPLIED, TRAINING, RAMPING, PENDING = "applied", "training", "ramping", "pending"
"""The status of a stage of a fit when a checkpoint was written (:class:`FitStage`)."""


class RampProgress(TypedDict):
    """How far a gradual stage (``MagnitudePruning(ramp=...)``) had got when a checkpoint was
    written.

    Keys:
        start_step, end_step: the ramp's first and last steps.
        target: the sparsity it reaches at ``end_step`` (when the stage is recorded).
        masks_recorded: whether the ramp had recorded masks on its layers yet (from the batch
            at ``start_step`` on); the stage itself is recorded only when the ramp ends.
        sparsity: the fraction of zeros those masks give the ramp's layers then (earlier
            stages' zeros included, as the ramp counts them); None before the ramp started.
    """

    start_step: int
    end_step: int
    target: float
    masks_recorded: bool
    sparsity: float | None


class FitStage(TypedDict):
    """One stage of a fit, as a checkpoint written during that fit records it.

    Keys:
        stage, method, kind, name: as in :class:`HistoryEntry`.
        status: ``"applied"`` (its result is in the weights), ``"training"`` (the weights hold
            its training state at that step), ``"ramping"`` (a ramp had recorded masks but not
            the stage: its zeros so far are in the weights) or ``"pending"`` (it had not
            fired: not in the weights).
        ramp: a gradual stage's progress (:class:`RampProgress`), whatever its status.
    """

    stage: str
    method: str
    kind: str
    name: str
    status: str
    ramp: NotRequired[RampProgress]


class TrainingRecord(TypedDict):
    """The stage that was training when a checkpoint was written, and how to complete it.

    Keys:
        completion: how a fresh model completes it (a key of ``edits.training.COMPLETIONS``).
        entry: the history entry the stage records when it finishes.
        layers: the modules it trains (names relative to the module whose state dict it is).
    """

    completion: str
    entry: HistoryEntry
    layers: list[str]


class FitRecord(TypedDict):
    """What a state dict taken during ``fit`` holds (under :data:`FIT_RECORD`).

    Keys:
        epoch, step: the Trainer's ``current_epoch`` and ``global_step`` then (those of
            ``ModelCheckpoint``'s file names).
        stages: every compression stage of the fit, in compression order, with its status.
        training: the stage that was training, if any (absent from a fit without one, whose
            record says which stages had not fired or not finished their ramp).
    """

    epoch: int
    step: int
    stages: list[FitStage]
    training: NotRequired[TrainingRecord]


def recorded_size(owner: str, entry: dict[str, Any], name: str, value: Any, limit: int) -> int:
    """A size that replaying ``entry`` would allocate by (a LoRA rank, a shared basis's rank or
    width), checked against what the layer ``owner`` allows before anything is allocated: a
    crafted or corrupt record (``r=10**6``) would otherwise make the loader allocate gigabytes
    before the strict load refuses the file.

    Args:
        owner: the layer the entry is recorded on.
        entry: the history entry (its ``stage`` is named).
        name: the recorded field, e.g. ``"r"``.
        value: its recorded value.
        limit: the largest value the layer allows.

    Returns:
        ``value``.

    Raises:
        PPQConfigError: naming the layer, the field and its value, when ``value`` is not an
            integer from 1 to ``limit``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise PPQConfigError(
            f"{owner}: the state records {name}={value!r} for stage {entry.get('stage')!r}; "
            f"the layer allows an integer from 1 to {limit}. The file is corrupt or was edited "
            "after it was written; it was refused before anything was allocated."
        )
    return value
