"""Sequential layer-wise calibration: one block at a time, as GPTQ/SparseGPT run it.

The engine captures the inputs (positional and keyword: attention masks, position ids,
rotary embeddings) of the first block of a model, then for every block:

1. hooks the block's target layers to accumulate their statistics (a Hessian ``2 X^T X / N``,
   activation norms, ...) while the block runs over every calibration input;
2. compresses those layers (the caller's ``compress`` function);
3. runs the block again to produce the next block's inputs — from the compressed block
   (``calibrate_on="compressed"``, the default) or, with ``"original"``, the outputs recorded in
   step 1 before compression (statistics then come from the dense model).

One set of calibration activations is held at a time (a block's outputs replace its inputs
batch by batch), and a block can be moved to ``device`` while the rest of the model stays where
it is. Blocks are found by ``ppq_lightning.calibration.blocks.find_blocks``; target layers
outside the blocks are calibrated afterwards with one pass of the whole model. Hooks are
removed whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppq_lightning.calibration.blocks import find_blocks
from ppq_lightning.calibration.capture import (
    BlockInputs,
    capture_block_inputs,
    first_output,
    no_cache,
)
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.errors import PPQConfigError, check_choice

CALIBRATE_ON = ("compressed", "original")

Observer = Callable[[str, nn.Module, Tensor], None]
"""Called with ``(layer name, layer, layer input)`` on every forward of a target layer."""
Compressor = Callable[[dict[str, nn.Module]], None]
"""Called with the target layers of one block (or of the remainder) to compress them."""


def check_calibrate_on(value: str) -> str:
    """Validate ``calibrate_on``.

    Raises:
        PPQConfigError: when it is not "compressed" or "original".
    """
    return check_choice("calibrate_on", value, CALIBRATE_ON)


def _check_finite(tensor: Tensor, where: str) -> None:
    # fast path: the sum of finite entries is finite (an overflow falls to the exact test)
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise PPQConfigError(
            f"NaN or Inf in the activations of {where}; the model produces "
            "non-finite values on the calibration data (check its dtype)."
        )


@contextlib.contextmanager
def observing(layers: dict[str, nn.Module], observe: Observer) -> Iterator[None]:
    """Call ``observe(name, layer, input)`` on every forward of ``layers``; hooks are always
    removed on exit."""
    handles = []
    checked: list[Tensor | None] = [None]  # layers fed the same tensor (q/k/v) check it once

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]  # the very object (layers fed the same tensor may share statistics)
            if x is not checked[0]:
                _check_finite(x, f"the input of {name}")
                checked[0] = x
            observe(name, module, x)

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(hook_for(name)))
        yield
    finally:
        checked[0] = None
        for handle in handles:
            handle.remove()


def _run_block(block: nn.Module, inputs: BlockInputs, name: str, advance: bool) -> None:
    """Run ``block`` on every calibration input; with ``advance``, each input is replaced by the
    block's output as soon as it is computed, so only one set of activations is ever held."""
    for k in range(len(inputs.args)):  # by index: no iterator keeps an old input alive
        args = inputs.args[k]
        out = first_output(block(*args, **inputs.kwargs[k]))
        _check_finite(out, f"block {name}")
        if advance:
            inputs.args[k] = (out, *args[1:])
        del args, out


@dataclass
class CalibrationReport:
    """What the engine did: blocks walked and forward passes made over the calibration set."""

    n_blocks: int = 0
    block_passes: int = 0
    model_passes: int = 0
    n_batches: int = 0


def calibrate_sequentially(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: Iterable[Any],
    observe: Observer,
    compress: Compressor,
    calibrate_on: str = "compressed",
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    desc: str = "calibrating",
) -> CalibrationReport:
    """Compress ``targets`` of ``model`` block by block with statistics from ``batches``.

    Args:
        model: the model to run (e.g. the LightningModule; called as ``forward(model, batch)``).
        targets: the layers to compress, by name (names relative to ``model``).
        batches: calibration batches.
        observe: accumulates statistics from a target layer's input.
        compress: compresses a group of target layers once their statistics are complete.
        calibrate_on: ``"compressed"`` (inputs of each block come from the already compressed
            blocks before it) or ``"original"`` (from the dense model).
        device: where each block runs (e.g. ``"cuda"``); None keeps the model's placement.
        forward: how to call the model on a batch; default :func:`default_forward`.
        desc: progress-bar label.

    Raises:
        PPQConfigError: on an empty calibration set, a bad ``calibrate_on``, a forward that
            never reaches the first block, or NaN/Inf activations (naming the layer).
    """
    check_calibrate_on(calibrate_on)
    forward = forward or default_forward
    batches = list(batches)
    if not batches:
        raise PPQConfigError(
            "the calibration dataloader is empty: give the datamodule a "
            "calibration_dataloader() with data, or raise num_calibration_batches."
        )
    report = CalibrationReport(n_batches=len(batches))
    found = find_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    in_blocks: dict[int, dict[str, nn.Module]] = {}
    if found is not None:
        prefix = names[id(found[1])]
        for name, layer in targets.items():
            if name.startswith(prefix + "."):
                index = int(name[len(prefix) + 1 :].split(".")[0]) if prefix else 0
                in_blocks.setdefault(index, {})[name] = layer
    rest = {n: m for n, m in targets.items() if all(n not in g for g in in_blocks.values())}

    def observe_rest() -> None:
        with observing(rest, observe):
            for batch in batches:
                forward(model, batch)
        report.model_passes += 1

    original = calibrate_on == "original"
    with torch.no_grad(), no_cache(model):
        if rest and original:
            observe_rest()  # on the dense model, before anything is compressed
        if in_blocks:
            blocks = found[1]
            inputs = capture_block_inputs(model, blocks[0], batches, forward)
        if rest and original:
            compress(rest)
        if in_blocks:
            home = next(blocks[0].parameters()).device
            run_on = torch.device(device) if device is not None else home
            inputs = BlockInputs(
                [move_data_to_device(a, run_on) for a in inputs.args],
                [move_data_to_device(k, run_on) for k in inputs.kwargs],
            )
            last = max(in_blocks)
            for index in tqdm(range(last + 1), desc=desc, unit="block", leave=False):
                block = blocks[index]
                block_name = f"{found[0]}.{index}"
                block.to(run_on)
                layers = in_blocks.get(index, {})
                # the next block's inputs come from the compressed block (a second pass) or,
                # with "original", from this pass; the last block's outputs are not needed
                rerun = bool(layers) and not original and index < last
                with observing(layers, observe):
                    _run_block(block, inputs, block_name, advance=index < last and not rerun)
                report.block_passes += 1
                if layers:
                    compress(layers)
                    if rerun:
                        _run_block(block, inputs, block_name, advance=True)
                        report.block_passes += 1
                block.to(home)
            report.n_blocks = last + 1
        if rest and not original:
            observe_rest()  # on the model compressed so far
            compress(rest)
    return report
