"""Sequential layer-wise calibration: one block at a time, as GPTQ/SparseGPT run it.

The engine walks the model's blocks in execution order (``calibration.blocks.
find_block_chain``: the decoder layers of a causal LM, the residual blocks of a ResNet's stages,
the MBConv blocks of an EfficientNet, ...). For every block it

1. captures the block's own call arguments, positional and keyword (attention masks and
   position embeddings of the block's attention type, position ids, ...), from the model's own
   forward: the blocks before it stand in for themselves (the one just before replays its
   outputs, computed in step 3), so whatever the model computes per block or between blocks is
   what a plain forward of the whole model would compute;
2. hooks the block's target layers to accumulate their statistics (a Hessian ``2 X^T X / N``,
   activation norms, ...) while the block runs over every calibration input;
3. compresses those layers (the caller's ``compress`` function) and runs the block again to
   produce its outputs for the next block — from the compressed block
   (``calibrate_on="compressed"``, the default) or, with ``"original"``, the outputs recorded in
   step 2 before compression (statistics then come from the dense model).

One set of calibration activations is held at a time (a block's outputs replace its inputs
batch by batch), and a block can be moved to ``device`` while the rest of the model stays where
it is. Target layers outside the blocks are calibrated afterwards with one pass of the whole
model. Hooks and stand-ins are removed whatever happens.
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

from ppq_lightning.calibration.blocks import BlockChain, feeds_directly, find_block_chain
from ppq_lightning.calibration.capture import (
    BlockInputs,
    capture_block_inputs,
    evaluating,
    first_output,
    no_cache,
    skeleton_of,
    standing_in,
)
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.calibration.progress import BlockProgress
from ppq_lightning.errors import PPQConfigError, check_choice
from ppq_lightning.modules.attention import check_runs_modules
from ppq_lightning.modules.offload import disk_weights

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


def _run_block(block: nn.Module, inputs: BlockInputs, name: str, advance: bool) -> Any:
    """Run ``block`` on every calibration input; with ``advance``, each input is replaced by the
    block's output as soon as it is computed, so only one set of activations is ever held.

    Returns:
        The structure of the block's output without its hidden states (``skeleton_of``).
    """
    skeleton = None
    for k in range(len(inputs.args)):  # by index: no iterator keeps an old input alive
        args = inputs.args[k]
        output = block(*args, **inputs.kwargs[k])
        out = first_output(output)
        _check_finite(out, f"block {name}")
        if k == 0:
            skeleton = skeleton_of(output)
        if advance:
            inputs.args[k] = (out, *args[1:])
        del args, out, output
    return skeleton


def _capture(
    model: nn.Module,
    chain: BlockChain,
    index: int,
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any],
    previous: BlockInputs | None,
    skeletons: list[Any],
    tails: list[torch.Size],
) -> BlockInputs:
    """The call arguments of block ``index`` per batch, from the model's own forward with the
    blocks before it standing in (the last replaying ``previous``'s hidden states)."""
    if index == 0:
        return capture_block_inputs(model, chain.blocks[0], batches, forward)
    outputs = [args[0] for args in previous.args]
    with standing_in(model, chain.names[:index], chain.blocks[:index], outputs, skeletons, tails):
        return capture_block_inputs(model, chain.blocks[index], batches, forward)


@dataclass
class CalibrationReport:
    """What the engine did: blocks walked and forward passes made over the calibration set.

    ``block_passes`` counts block forwards over all batches; ``model_passes`` whole-model passes
    (for layers outside the blocks); ``capture_passes`` the model forwards up to a block, with
    the blocks before it standing in, that capture its call arguments (one per block after the
    first: the embeddings and what the model computes per block, not the blocks themselves),
    except for a block the model provably feeds the previous block's output alone
    (``blocks.feeds_directly``: consecutive blocks of a plain ``nn.Sequential``);
    ``resumed_blocks`` the blocks whose compressed state came from saved progress.
    """

    n_blocks: int = 0
    block_passes: int = 0
    model_passes: int = 0
    capture_passes: int = 0
    n_batches: int = 0
    resumed_blocks: int = 0


def _fed_directly(model: nn.Module, chain: BlockChain, index: int, inputs: BlockInputs) -> bool:
    """Whether block ``index`` receives exactly the previous block's outputs, which ``inputs``
    then already hold (``_run_block`` advanced them): the previous block took its hidden states
    alone, and the model composes the two (``blocks.feeds_directly``)."""
    alone = all(len(a) == 1 for a in inputs.args) and not any(inputs.kwargs)
    return alone and feeds_directly(model, chain.names[index - 1], chain.names[index])


def _device_of(blocks: tuple[nn.Module, ...], model: nn.Module) -> torch.device:
    for module in (*blocks, model):
        parameter = next(module.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


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
    progress: BlockProgress | None = None,
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
        progress: the stage's progress on disk (``calibration.progress.BlockProgress``), or
            None. A block whose saved state matches is not compressed again: its state is
            loaded and the block run once to feed the next (after the dense pass, with
            ``"original"``); every block compressed is saved once it is. Layers outside the
            blocks are compressed again on every run.

    An ``nn.MultiheadAttention``'s projections (``modules.attention``) are observed like any
    linear layer: while hooked, the attention calls them as modules, so ``q_proj``/``k_proj``/
    ``v_proj`` see the query, key and value it receives and ``out_proj`` the attention output.

    Raises:
        CorruptStateError: (a ``PPQConfigError``) naming a saved progress file that cannot be
            read, before it changes the block.
        PPQConfigError: on an empty calibration set, a bad ``calibrate_on``, a forward that
            never reaches the first block, NaN/Inf activations (naming the layer), a target
            that never runs as a module (the projection of an attention subclass with its own
            forward; or, from the observer, a layer the forward never called).
    """
    check_calibrate_on(calibrate_on)
    check_runs_modules(targets, "calibration statistics")
    forward = forward or default_forward
    batches = list(batches)
    if not batches:
        raise PPQConfigError(
            "the calibration dataloader is empty: give the datamodule a "
            "calibration_dataloader() with data, or raise num_calibration_batches."
        )
    report = CalibrationReport(n_batches=len(batches))
    chain = find_block_chain(model)
    in_blocks: dict[int, dict[str, nn.Module]] = {}
    for name, layer in targets.items():
        index = chain.index_of(name) if chain is not None else None
        if index is not None:
            in_blocks.setdefault(index, {})[name] = layer
    rest = {n: m for n, m in targets.items() if all(n not in g for g in in_blocks.values())}

    def observe_rest() -> None:
        with observing(rest, observe):
            for batch in batches:
                forward(model, batch)
        report.model_passes += 1

    def compress_rest() -> None:
        with contextlib.ExitStack() as stack:
            for layer in rest.values():  # weights on disk: edited as copies, written back
                store = disk_weights(layer)
                if store is not None:
                    stack.enter_context(store.materialized(layer))
            compress(rest)

    original = calibrate_on == "original"
    if progress is not None and in_blocks:  # the model as the stage starts
        progress.begin(model, list(chain.names), batches)
    with torch.no_grad(), no_cache(model), evaluating(model):
        if rest and original:
            observe_rest()  # on the dense model, before anything is compressed
        inputs: BlockInputs | None = None
        if in_blocks:  # captured before any layer outside the blocks (a stem) is compressed
            inputs = _capture(model, chain, 0, batches, forward, None, [], [])
        if rest and original:
            compress_rest()
        if in_blocks:
            home = _device_of(chain.blocks, model)
            run_on = torch.device(device) if device is not None else home
            last = max(in_blocks)
            skeletons: list[Any] = []
            tails: list[torch.Size] = []
            for index in tqdm(range(last + 1), desc=desc, unit="block", leave=False):
                if index and not _fed_directly(model, chain, index, inputs):
                    inputs = _capture(
                        model, chain, index, batches, forward, inputs, skeletons, tails
                    )
                    report.capture_passes += 1
                inputs = BlockInputs(
                    [move_data_to_device(a, run_on) for a in inputs.args],
                    [move_data_to_device(k, run_on) for k in inputs.kwargs],
                )
                block, block_name = chain.blocks[index], chain.names[index]
                layers = in_blocks.get(index, {})
                # the next block's inputs come from the compressed block (a second pass) or,
                # with "original", from this pass; the last block's outputs are not needed
                rerun = bool(layers) and not original and index < last
                with resident(block, run_on, home, edited=bool(layers)):
                    resume = bool(layers) and progress is not None
                    if resume and progress.resumable(index, block):
                        skeleton = _resume_block(
                            block, inputs, block_name, index, progress, original, index < last
                        )
                        report.block_passes += skeleton is not None
                        report.resumed_blocks += 1
                    else:
                        with observing(layers, observe):
                            skeleton = _run_block(
                                block, inputs, block_name, advance=index < last and not rerun
                            )
                        report.block_passes += 1
                        if layers:
                            compress(layers)
                            if progress is not None:
                                progress.save(index, block_name, block)
                            if rerun:
                                skeleton = _run_block(block, inputs, block_name, advance=True)
                                report.block_passes += 1
                skeletons.append(skeleton)
                tails.append(inputs.args[0][0].shape[1:])
            report.n_blocks = last + 1
        if rest and not original:
            observe_rest()  # on the model compressed so far
            compress_rest()
    return report


def _resume_block(
    block: nn.Module,
    inputs: BlockInputs,
    name: str,
    index: int,
    progress: BlockProgress,
    original: bool,
    advance: bool,
) -> Any:
    """Load block ``index``'s saved state into ``block`` instead of compressing it, and (when
    ``advance``) run it once to feed the next block: on the dense block before the load with
    ``original``, on the loaded one otherwise (as the uninterrupted run computed them).

    Returns:
        The block's output skeleton, or None when it was not run (the last block).
    """
    skeleton = None
    if advance and original:
        skeleton = _run_block(block, inputs, name, advance=True)
    progress.load(index, block)
    if advance and not original:
        skeleton = _run_block(block, inputs, name, advance=True)
    return skeleton


@contextlib.contextmanager
def resident(
    block: nn.Module, device: torch.device, home: torch.device, edited: bool = True
) -> Iterator[None]:
    """Hold ``block`` on ``device`` while it is calibrated, then put it back.

    A block whose weights are on disk (``modules.offload``) is copied to ``device`` and, when
    ``edited``, written back to the store's folder on exit (its old pages released); a block
    in memory is moved to ``device`` and back to ``home`` (also when the body fails).
    """
    store = disk_weights(block)
    if store is not None and not edited and device.type == "cpu":
        yield  # only run: its mapped pages are read, then dropped
        store.release(block)
        return
    if store is not None:
        with store.materialized(block, device, write=edited):
            yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)
