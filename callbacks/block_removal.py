"""Block removal in the manner of SLEB (Song et al., 2024): drop whole transformer blocks."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppq_lightning.calibration import (
    BlockInputs,
    _first_output,
    _no_cache,
    batch_input,
    capture_block_inputs,
    default_forward,
    find_blocks,
    recording_block_inputs,
)
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


class _Replay(nn.Module):
    """Stands in for a block: ignores its input and returns ``outputs[k]`` on its k-th call (one
    call per calibration batch). Attributes a model reads from its blocks (``attention_type``,
    ...) come from ``block``, which is not a submodule."""

    def __init__(self, block: nn.Module, outputs: list[Any]) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self.outputs, self.calls = outputs, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls == len(self.outputs):
            raise PPQConfigError(
                "the model ran its blocks more than once per calibration batch; BlockRemoval "
                "needs one pass through them per batch (check the callback's `forward_fn`)."
            )
        output = self.outputs[self.calls]
        self.calls += 1
        return output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_block" not in self.__dict__:
                raise
            return getattr(self.__dict__["_block"], name)


def _with_hidden(hidden: Tensor, output: Any) -> Any:
    """A block's output structure (a tensor, or a tuple/list led by one) led by ``hidden``."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


class BlockRemoval(CompressionCallback):
    """Remove whole blocks, chosen greedily: at each step the block whose removal increases the
    calibration loss (next-token cross-entropy) the least goes, as SLEB does.

    Fires once, before the first evaluation or at fit start. The blocks are really deleted
    (the HF config's ``num_hidden_layers`` follows), their weights count as stored in 0 bits in
    the measured compression rate, and the removal is recorded on the blocks' parent module so
    that a checkpoint of the pruned model loads into a fresh full-depth model.

    Cost: a step with ``K`` blocks left scores the ``K`` candidates with about ``K²/2`` block
    forwards over the calibration batches (plus ``K`` passes of the embeddings and head), half
    of the ``K²`` of one model forward per candidate, with the same losses: the blocks before a
    candidate compute what they compute in the current model, so one walk through the blocks
    keeps the hidden states at the candidate's input and runs only the blocks after it (and the
    head) from there. Memory: two sets of hidden states (one per calibration batch each).

    Args:
        n_blocks: how many blocks to remove; or
        ratio: the fraction of blocks to remove (rounded), in (0, 1).
        num_calibration_batches: calibration batches used to score removals.
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
            scores = self._candidate_losses(model, name, removed, batches)
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

    def _candidate_losses(
        self, model: nn.Module, name: str, removed: list[int], batches: list[Any]
    ) -> dict[int, float]:
        """The calibration loss of ``model`` without the blocks ``removed`` and each other block,
        by the index of that block (as if each were scored with a whole forward pass).

        The kept blocks are walked in order, holding the hidden states at the input of the
        current one (``inputs``: per batch, the arguments the model passes it). Its candidate
        loss comes from a forward of the model whose block container holds a :class:`_Replay`
        returning those hidden states, then the blocks after it: the model itself feeds them its
        keyword arguments (masks of their ``layer_types``, position embeddings) and applies its
        head. The arguments of the next block are recorded on the way; the hidden states then
        advance through the current block (the last block is not run when there is another).

        Raises:
            PPQConfigError: when the model's forward does not run its blocks once per batch.
        """
        kept = [i for i in range(len(model.get_submodule(name))) if i not in removed]
        scores: dict[int, float] = {}
        with _no_cache(model), without_blocks(model, name, set(removed)):
            blocks = model.get_submodule(name)
            inputs = capture_block_inputs(model, blocks[0], batches, self.forward_fn)
            outputs: list[Any] = []
            for position, index in enumerate(kept):
                last = position == len(kept) - 1
                # the last block's output is unused but for its structure: the previous one's serves
                if not last or not outputs:
                    outputs = [
                        blocks[position](*args, **kwargs)
                        for args, kwargs in zip(inputs.args, inputs.kwargs, strict=True)
                    ]
                replay = _Replay(
                    blocks[position],
                    [_with_hidden(a[0], o) for a, o in zip(inputs.args, outputs, strict=True)],
                )
                recording = (
                    contextlib.nullcontext(BlockInputs())
                    if last
                    else recording_block_inputs(blocks[position + 1])
                )
                with (
                    without_blocks(model, name, set(range(position)), {position: replay}),
                    recording as following,
                ):
                    scores[index] = causal_lm_loss(model, batches, self.forward_fn)
                if replay.calls != len(batches):
                    raise PPQConfigError(
                        f"the model ran its blocks on {replay.calls} of {len(batches)} "
                        "calibration batches."
                    )
                if not last:
                    inputs = BlockInputs(
                        [
                            (_first_output(o), *a[1:])
                            for o, a in zip(outputs, following.args, strict=True)
                        ],
                        following.kwargs,
                    )
        return scores
