"""The ``block_checkpoints`` argument of the calibrated stages: where their progress is saved.

GPTQ, SparseGPT, Wanda (``CalibratedCompression``), channel pruning and SLEB save each finished
block (or search step) to disk so that a killed run, started again with the same command,
continues where it stopped (``calibration.progress``; docs/scale.md, "Resuming a
calibration"). ``block_checkpoints`` says where, and is not part of the stage's identity.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from ppq_lightning.calibration.distributed import world
from ppq_lightning.calibration.progress import BlockLoader, BlockProgress
from ppq_lightning.callbacks.stage import CompressionStage
from ppq_lightning.errors import bad_value

BLOCK_CHECKPOINTS = "True (under a Trainer), False, or a folder path"


def check_block_checkpoints(value: Any) -> bool | str | os.PathLike[str]:
    """Accept ``True``, ``False`` or a non-empty folder path for ``block_checkpoints``.

    Raises:
        PPQConfigError: naming ``block_checkpoints`` and the value.
    """
    if isinstance(value, (bool, os.PathLike)):
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise bad_value("block_checkpoints", value, BLOCK_CHECKPOINTS)


def block_progress(
    stage: CompressionStage,
    block_checkpoints: bool | str | os.PathLike[str],
    metrics: dict[str, Any] | None = None,
    loader: BlockLoader | None = None,
) -> BlockProgress | None:
    """The progress ``stage`` keeps on disk (``calibration.progress.BlockProgress``), or None:
    under ``<folder>/ppq_progress/`` for a folder, under the running Trainer's
    ``default_root_dir`` for ``True`` (none without a Trainer: ``stage.apply(model)``), none
    for ``False``, and none on more than one data-parallel rank (each rank would need every
    file; a warning says so).

    Args:
        stage: the stage (its name and state key name the folder and fingerprint).
        block_checkpoints: the stage's ``block_checkpoints`` argument.
        metrics: the stage's per-layer metrics, kept with each block.
        loader: how a saved block state is loaded (a stage that changes shapes passes
            ``edits.loading.load_module_state``).
    """
    if block_checkpoints is False:
        return None
    if block_checkpoints is True:
        if stage.trainer is None:
            return None
        root = stage.trainer.default_root_dir
    else:
        root = block_checkpoints
    if world()[1] > 1:
        rank_zero_warn(
            f"[ppq] stage {stage.name!r}: block_checkpoints are not kept in a data-parallel "
            "calibration (each rank would need every rank's files); a killed run starts the "
            "stage from its first block."
        )
        return None
    return BlockProgress(root, stage.name, stage.state_key, metrics, loader)
