"""Block removal in the manner of SLEB (Song et al., 2024): drop whole transformer blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ppq_lightning.calibration import batch_input, default_forward, find_blocks
from ppq_lightning.calibration_data import calibration_batches, check_num_batches
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.distributed import all_reduce_mean, reduce_device
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.state import record_stage
from ppq_lightning.structure import remove_blocks, without_blocks


def causal_lm_loss(model: nn.Module, batches: list[Any], forward: Any = default_forward) -> float:
    """Mean next-token cross-entropy of ``model`` over ``batches`` (logits or ``.logits`` out),
    averaged over all ranks' batches under data-parallel calibration."""
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        out = forward(model, batch)
        logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, vocab)
        ids = batch_input(batch).to(logits.device)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
        )
        total += loss.detach().double().cpu()
    mean, _ = all_reduce_mean((total / len(batches)).to(reduce_device()), len(batches))
    return float(mean)


class BlockRemoval(CompressionCallback):
    """Remove whole blocks, chosen greedily: at each step the block whose removal increases the
    calibration loss (next-token cross-entropy) the least goes, as SLEB does.

    Fires once, before the first evaluation or at fit start. The blocks are really deleted
    (the HF config's ``num_hidden_layers`` follows), their weights count as stored in 0 bits in
    the measured compression rate, and the removal is recorded on the blocks' parent module so
    that a checkpoint of the pruned model loads into a fresh full-depth model. Cost: about
    ``n_blocks x depth`` forward passes of the model over the calibration batches.

    Args:
        n_blocks: how many blocks to remove; or
        ratio: the fraction of blocks to remove (rounded), in (0, 1).
        num_calibration_batches: calibration batches used to score removals.
        **kwargs: ``name``, ``b_orig``, ``log_layers`` (``targets``/``ignore`` are not used:
            blocks are found from the model's structure).

    Raises:
        PPQConfigError: when neither or both of ``n_blocks``/``ratio`` are given, or at run time
            when ``n_blocks`` is not smaller than the number of blocks, or the model has no
            repeated blocks.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.BlockRemoval
              init_args: {ratio: 0.2, num_calibration_batches: 32}
    """

    label = "sleb"
    kind = "P"

    def __init__(
        self,
        n_blocks: int | None = None,
        ratio: float | None = None,
        num_calibration_batches: int = 32,
        **kwargs: Any,
    ) -> None:
        if (n_blocks is None) == (ratio is None):
            raise PPQConfigError(f"n_blocks={n_blocks!r}, ratio={ratio!r}: give exactly one.")
        if n_blocks is not None and (
            isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1
        ):
            raise bad_value("n_blocks", n_blocks, "an integer >= 1")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
            raise bad_value("ratio", ratio, "a number in (0, 1)")
        super().__init__(**kwargs)
        self.n_blocks, self.ratio = n_blocks, ratio
        self.num_calibration_batches = check_num_batches(num_calibration_batches)
        self.forward_fn = default_forward

    def stage_config(self) -> dict[str, Any]:
        return {"n_blocks": self.n_blocks, "ratio": self.ratio}

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
        batches = calibration_batches(self.trainer, self.num_calibration_batches, self.dataloader)
        removed: list[int] = []
        losses: list[float] = []
        for _ in tqdm(range(n), desc=self.display_label, unit="block", leave=False):
            scores = {}
            for candidate in (i for i in range(depth) if i not in removed):
                with without_blocks(model, name, {*removed, candidate}):
                    scores[candidate] = causal_lm_loss(model, batches, self.forward_fn)
            best = min(scores, key=scores.__getitem__)
            removed.append(best)
            losses.append(scores[best])
        removed_weights = remove_blocks(model, name, removed)
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        record_stage(
            parent,
            {
                **self.history_entry(),
                "container": attribute,
                "removed": removed,
                "removed_weights": removed_weights,
            },
        )
        return {
            name: {
                "removed_blocks": float(n),
                "calibration_loss": losses[-1],
                **{f"removed_{step}": float(i) for step, i in enumerate(removed)},
            }
        }
