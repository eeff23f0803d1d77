"""Block removal in the manner of SLEB (Song et al., 2024): drop whole transformer blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ppq_lightning.calibration.blocks import find_blocks
from ppq_lightning.calibration.data import check_num_batches
from ppq_lightning.calibration.scoring import greedy_block_removal
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.block_checkpoints import block_progress, check_block_checkpoints
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.edits.blocks import remove_and_record
from ppq_lightning.errors import (
    PPQConfigError,
    bad_value,
    check_count_or_ratio,
)
from ppq_lightning.modules.config import StageConfig


@dataclass(frozen=True, kw_only=True)
class BlockRemovalConfig(StageConfig):
    """Block removal's arguments (see :class:`BlockRemoval`).

    Raises:
        PPQConfigError: both or neither of ``n_blocks``/``ratio``, or either out of range, or a
            bad ``num_calibration_batches``.
    """

    n_blocks: int | None = None
    ratio: float | None = None
    num_calibration_batches: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count_or_ratio("n_blocks", self.n_blocks, self.ratio)
        check_num_batches(self.num_calibration_batches)


class BlockRemoval(CompressionCallback):
    """Remove whole blocks, chosen greedily: at each step the block whose removal increases the
    calibration loss (next-token cross-entropy) the least goes, as SLEB does.

    Fires once, before the first evaluation or at fit start. The blocks are really deleted
    (the HF config's ``num_hidden_layers`` follows), their weights count as stored in 0 bits in
    the measured compression rate, and the removal is recorded on the blocks' parent module so
    that a checkpoint of the pruned model loads into a fresh full-depth model.

    Cost: a step with ``K`` blocks left scores the ``K`` candidates with about ``K²/2`` block
    forwards over the calibration batches (plus ``K`` passes of the embeddings and head), half
    of the ``K²`` of one model forward per candidate, with the same losses
    (``ppq_lightning.calibration.scoring``). Memory: two sets of hidden states (one per
    calibration batch each).

    Args:
        n_blocks: how many blocks to remove; or
        ratio: the fraction of blocks to remove (rounded), in (0, 1).
        num_calibration_batches: calibration batches used to score removals.
        block_checkpoints: save each step's choice (the block removed, its loss) so a killed
            run continues from its last finished step (``True``: under the Trainer's
            ``default_root_dir``; a folder; ``False``: see docs/scale.md, "Resuming a
            calibration"). Not part of the identity.
        **kwargs: ``name``, ``b_orig``, ``log_layers`` (``targets``/``ignore`` are not used:
            blocks are found from the model's structure).

    Raises:
        PPQConfigError: when neither or both of ``n_blocks``/``ratio`` are given, or at run time
            when ``n_blocks`` is not smaller than the number of blocks, the model has no
            repeated blocks, or its forward does not run them once per calibration batch.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.BlockRemoval
              init_args: {ratio: 0.2, num_calibration_batches: 32}
    """

    default_name = "sleb"
    config_class = BlockRemovalConfig
    edits_structure = True
    streams_blocks = True  # removes blocks; writes no weight
    kind = StageKind.PRUNE

    def __init__(
        self,
        n_blocks: int | None = None,
        ratio: float | None = None,
        num_calibration_batches: int = 32,
        block_checkpoints: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            n_blocks=n_blocks,
            ratio=ratio,
            num_calibration_batches=num_calibration_batches,
            **kwargs,
        )
        self.block_checkpoints = check_block_checkpoints(block_checkpoints)
        self.resumed_steps = 0

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        found = find_blocks(model)
        if found is None:
            raise PPQConfigError(
                "BlockRemoval needs a model with repeated blocks (an "
                "nn.ModuleList of identical blocks); none was found."
            )
        name, container = found
        depth = len(container)
        n = self.n_blocks if self.n_blocks is not None else round(self.ratio * depth)
        if not 1 <= n < depth:
            raise bad_value(
                "n_blocks",
                n,
                f"an integer from 1 to {depth - 1} (the model has {depth} blocks in {name})",
            )
        batches = self.calibration_batches(self.num_calibration_batches)
        progress = block_progress(self, self.block_checkpoints)
        removed, losses = greedy_block_removal(
            model, name, n, batches, self.model_forward, self.name, progress
        )
        remove_and_record(model, name, removed, self.history_entry())
        if progress is not None:
            self.resumed_steps = len(progress.resumed)
            progress.finish()
        return {
            name: {
                "removed_blocks": float(n),
                "calibration_loss": losses[-1],
                **{f"removed_{step}": float(i) for step, i in enumerate(removed)},
            }
        }
