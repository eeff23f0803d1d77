"""Scoring blocks for removal (SLEB, Song et al., 2024): the calibration loss of the model
without each candidate block, and the greedy search built on it. The loss is the next-token
cross-entropy for a language model (SLEB's) and the cross-entropy against the batch's labels
for a classifier (a ViT's encoder blocks).

A step with ``K`` blocks left scores the ``K`` candidates with about ``K²/2`` block forwards
over the calibration batches (plus ``K`` passes of the embeddings and head), half of the ``K²``
of one model forward per candidate, with the same losses: the blocks before a candidate compute
what they compute in the current model, so one walk through the blocks keeps the hidden states
at the candidate's input and runs only the blocks after it (and the head) from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ppq_lightning.calibration.blocks import without_blocks
from ppq_lightning.calibration.capture import (
    BlockInputs,
    Replay,
    capture_block_inputs,
    evaluating,
    first_output,
    model_input,
    no_cache,
    recording_block_inputs,
    with_hidden,
)
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.calibration.distributed import all_reduce_mean, reduce_device
from ppq_lightning.calibration.progress import BlockProgress
from ppq_lightning.errors import PPQConfigError

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
"""Keys under which a dict batch holds a classifier's labels."""


def _labels(batch: Any, size: int) -> torch.Tensor | None:
    """A classifier's labels in ``batch``: the integer tensor of shape ``(size,)`` under one of
    :data:`LABEL_KEYS` of a dict, or among the items of a tuple/list (``(images, labels)``)."""
    items = (
        [batch[k] for k in LABEL_KEYS if k in batch]
        if isinstance(batch, dict)
        else list(batch)
        if isinstance(batch, (tuple, list))
        else []
    )
    for item in items:
        integer = isinstance(item, torch.Tensor) and not item.is_floating_point()
        if integer and item.shape == (size,):
            return item
    return None


def _batch_loss(model: nn.Module, batch: Any, forward: Any) -> torch.Tensor:
    """The loss block removal scores on one batch: the next-token cross-entropy of a language
    model (logits ``(B, T, vocab)`` over the integer ids it was called with), or the
    cross-entropy of a classifier (logits ``(B, classes)``) against the batch's labels.

    Raises:
        PPQConfigError: when the output is neither, or a classifier's batch holds no labels.
    """
    out = forward(model, batch)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        ids = model_input(model, batch, forward).to(logits.device)
        if not ids.is_floating_point() and ids.shape == logits.shape[:2]:
            return nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
            )
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        labels = _labels(batch, logits.shape[0])
        if labels is None:
            raise PPQConfigError(
                f"block removal scores a classifier (output {tuple(logits.shape)}) by its "
                "cross-entropy against the batch's labels, but the calibration batch holds no "
                f"integer tensor of shape ({logits.shape[0]},) (as items of a tuple, or under "
                f"one of {list(LABEL_KEYS)} of a dict). Calibrate on labelled batches."
            )
        return nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
    raise PPQConfigError(
        f"block removal scores a language model (logits (batch, tokens, vocab) over its token "
        f"ids) or a classifier (logits (batch, classes) and labelled batches); the model's "
        f"output is {shape}. Pass forward_fn=... to the stage so that it returns such logits."
    )


def calibration_loss(model: nn.Module, batches: list[Any], forward: Any = default_forward) -> float:
    """Mean loss of ``model`` over ``batches`` (:func:`_batch_loss`: next-token cross-entropy
    of a language model, cross-entropy of a classifier against the batch's labels), averaged
    over all ranks' batches under data-parallel calibration.

    Raises:
        PPQConfigError: as :func:`_batch_loss`.
    """
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        total += _batch_loss(model, batch, forward).detach().double().cpu()
    mean, _ = all_reduce_mean((total / len(batches)).to(reduce_device()), len(batches))
    return float(mean)


def candidate_losses(
    model: nn.Module,
    name: str,
    removed: list[int],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[int, float]:
    """The calibration loss of ``model`` without the blocks ``removed`` and each other block,
    by the index of that block (as if each were scored with a whole forward pass).

    The kept blocks are walked in order, holding the hidden states at the input of the
    current one (``inputs``: per batch, the arguments the model passes it). Its candidate
    loss comes from a forward of the model whose block container holds a
    :class:`~ppq_lightning.calibration.capture.Replay` returning those hidden states, then the
    blocks after it: the model itself feeds them its keyword arguments (masks of their
    ``layer_types``, position embeddings) and applies its head. The arguments of the next block
    are recorded on the way; the hidden states then advance through the current block (the
    last block is not run when there is another).

    Args:
        model: the model (called as ``forward(model, batch)``; its output is logits or has
            ``.logits``).
        name: the name of its block container.
        removed: indices of the blocks already removed.
        batches: calibration batches.
        forward: how to call the model on a batch.

    Raises:
        PPQConfigError: when the model's forward does not run its blocks once per batch.
    """
    kept = [i for i in range(len(model.get_submodule(name))) if i not in removed]
    scores: dict[int, float] = {}
    with no_cache(model), evaluating(model), without_blocks(model, name, set(removed)):
        blocks = model.get_submodule(name)
        inputs = capture_block_inputs(model, blocks[0], batches, forward)
        outputs: list[Any] = []
        for position, index in enumerate(kept):
            last = position == len(kept) - 1
            # the last block's output is unused but for its structure: the previous one's serves
            if not last or not outputs:
                outputs = [
                    blocks[position](*args, **kwargs)
                    for args, kwargs in zip(inputs.args, inputs.kwargs, strict=True)
                ]
            replay = Replay(
                blocks[position],
                [with_hidden(a[0], o) for a, o in zip(inputs.args, outputs, strict=True)],
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
                scores[index] = calibration_loss(model, batches, forward)
            if replay.calls != len(batches):
                raise PPQConfigError(
                    f"the model ran its blocks on {replay.calls} of {len(batches)} "
                    "calibration batches."
                )
            if not last:
                inputs = BlockInputs(
                    [
                        (first_output(o), *a[1:])
                        for o, a in zip(outputs, following.args, strict=True)
                    ],
                    following.kwargs,
                )
    return scores


def greedy_block_removal(
    model: nn.Module,
    name: str,
    n_blocks: int,
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    desc: str = "sleb",
    progress: BlockProgress | None = None,
) -> tuple[list[int], list[float]]:
    """Choose ``n_blocks`` blocks of the container ``name`` to remove, one at a time: at each
    step the block whose removal raises the calibration loss least (the model is left as it was).

    Args:
        progress: the search's steps on disk (``calibration.progress``), or None: the steps a
            killed run of this search saved (the whole model, the data and the stage are
            fingerprinted) are taken as they are, and each new step is saved once chosen.

    Returns:
        The removed block indices in the order chosen, and the calibration loss after each step.

    Raises:
        PPQConfigError: as :func:`candidate_losses`.
        CorruptStateError: when the saved steps cannot be read or do not fit the model.
    """
    removed: list[int] = []
    losses: list[float] = []
    if progress is not None:
        progress.begin(model, [], batches)
        depth = len(model.get_submodule(name))
        for step in progress.load_steps()[:n_blocks]:
            block, loss = step.get("block"), step.get("loss")
            if type(block) is not int or not 0 <= block < depth or block in removed:
                raise progress.corrupt_steps(f"step {step} does not name a new block of {depth}")
            removed.append(block)
            losses.append(float(loss))
    for _ in tqdm(range(len(removed), n_blocks), desc=desc, unit="block", leave=False):
        scores = candidate_losses(model, name, removed, batches, forward)
        best = min(scores, key=scores.__getitem__)
        removed.append(best)
        losses.append(scores[best])
        if progress is not None:
            steps = zip(removed, losses, strict=True)
            progress.save_steps([{"block": b, "loss": x} for b, x in steps])
    return removed, losses
