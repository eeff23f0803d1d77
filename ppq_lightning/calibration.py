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
it is. Blocks are found from the structure of the model (the
largest ``nn.ModuleList``/``nn.Sequential`` of identical blocks: HF Llama, Mistral, Qwen2, OPT,
GPT-2, timm ViTs, ...); target layers outside the blocks are calibrated afterwards with one
pass of the whole model. Hooks are removed whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppq_lightning.errors import PPQConfigError, bad_value

CALIBRATE_ON = ("compressed", "original")
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")

Observer = Callable[[str, nn.Module, Tensor], None]
"""Called with ``(layer name, layer, layer input)`` on every forward of a target layer."""
Compressor = Callable[[dict[str, nn.Module]], None]
"""Called with the target layers of one block (or of the remainder) to compress them."""


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


@dataclass
class BlockInputs:
    """The calibration inputs of one block: per batch, positional and keyword arguments."""

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def check_calibrate_on(value: str) -> str:
    """Validate ``calibrate_on``.

    Raises:
        PPQConfigError: when it is not "compressed" or "original".
    """
    if value not in CALIBRATE_ON:
        raise bad_value("calibrate_on", value, f"one of {', '.join(CALIBRATE_ON)}")
    return value


def find_blocks(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The repeated blocks of ``model``: ``(name, container)`` or None when there are none.

    The container is the ``nn.ModuleList``/``nn.Sequential`` with the most parameters among
    those whose children (at least two) all have one class.
    """
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def batch_input(batch: Any) -> Any:
    """What the model is called with: a tensor batch, ``batch["input_ids"]``, or ``batch[0]``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise PPQConfigError(
                f"a calibration batch is a dict with keys {sorted(batch)}; "
                "expected 'input_ids', or set the callback's `forward_fn`."
            )
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise PPQConfigError(
        f"cannot feed a calibration batch of type {type(batch).__name__} to "
        "the model; set the callback's `forward_fn`."
    )


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on the batch's input, moved to the device of the model's parameters."""
    device = next(model.parameters()).device
    return model(_to(batch_input(batch), device))


def _first_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


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


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """Turn off HF key/value caches while calibrating (they would grow across batches)."""
    configs = [
        m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "use_cache")
    ]
    previous = [c.use_cache for c in configs]
    try:
        for c in configs:
            c.use_cache = False
        yield
    finally:
        for c, value in zip(configs, previous, strict=True):
            c.use_cache = value


def _reuse_equal(value: Any, previous: Any) -> Any:
    """``value``, or ``previous`` where it holds equal tensors: keyword arguments that are the
    same for every batch (rotary embeddings, position ids, masks) are then stored once."""
    if isinstance(value, Tensor) and isinstance(previous, Tensor):
        same = value.dtype == previous.dtype and value.device == previous.device
        return previous if same and torch.equal(value, previous) else value
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        items = tuple(_reuse_equal(v, p) for v, p in zip(value, previous, strict=True))
        return previous if all(i is p for i, p in zip(items, previous, strict=True)) else items
    return value


def _record_call(captured: BlockInputs, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Append a block call's arguments to ``captured``, key/value caches left out."""
    previous = captured.kwargs[-1] if captured.kwargs else {}
    kwargs = {key: _reuse_equal(value, previous.get(key)) for key, value in kwargs.items()}
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    captured.args.append(tuple(args))
    captured.kwargs.append(kwargs)


@contextlib.contextmanager
def recording_block_inputs(block: nn.Module) -> Iterator[BlockInputs]:
    """Record what ``block`` receives on each call while in the context (the forward goes on,
    unlike :func:`capture_block_inputs`); the hook is removed whatever happens."""
    captured = BlockInputs()

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        _record_call(captured, args, kwargs)

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[Any], forward: Callable[[nn.Module, Any], Any]
) -> BlockInputs:
    """Run ``model`` on each batch up to ``block`` and record what ``block`` receives."""
    captured = BlockInputs()

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        _record_call(captured, args, kwargs)
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                forward(model, batch)
    finally:
        handle.remove()
    if len(captured.args) != len(batches):
        raise PPQConfigError(
            f"the model's forward did not reach its first block on "
            f"{len(batches) - len(captured.args)} calibration batch(es)."
        )
    return captured


def _run_block(block: nn.Module, inputs: BlockInputs, name: str, advance: bool) -> None:
    """Run ``block`` on every calibration input; with ``advance``, each input is replaced by the
    block's output as soon as it is computed, so only one set of activations is ever held."""
    for k in range(len(inputs.args)):  # by index: no iterator keeps an old input alive
        args = inputs.args[k]
        out = _first_output(block(*args, **inputs.kwargs[k]))
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
    with torch.no_grad(), _no_cache(model):
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
                [_to(a, run_on) for a in inputs.args], [_to(k, run_on) for k in inputs.kwargs]
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
