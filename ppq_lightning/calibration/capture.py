"""Capturing what a block of a model receives: its positional and keyword arguments per call.

The calibration engine and block scoring run blocks on their own, so they need the arguments
the model's forward hands each block (hidden states, attention masks, position ids, rotary
embeddings). They are recorded by a forward pre-hook, with key/value caches left out; keyword
arguments equal in every batch are stored once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration.data import default_forward, forward_call, forward_error
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.tree import replace_module

CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


@dataclass
class BlockInputs:
    """The calibration inputs of one block: per batch, positional and keyword arguments."""

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def first_output(output: Any) -> Tensor:
    """The hidden states of a block's output (a tensor, or a tuple/list led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
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


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode while in the context (BatchNorm uses and keeps its running
    statistics, dropout is off), then give every module back the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


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
    for key in CACHE_KWARGS:
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


class Replay(nn.Module):
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
                "the model ran its blocks more than once per calibration batch; block-wise "
                "calibration needs one pass through them per batch (check the stage's "
                "`forward_fn`)."
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


def with_hidden(hidden: Tensor, output: Any) -> Any:
    """A block's output structure (a tensor, or a tuple/list led by one) led by ``hidden``."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


class PassThrough(nn.Module):
    """Stands in for an earlier block while a later block's inputs are captured: returns its
    own input hidden states in the block's output structure (``skeleton``, see
    :func:`skeleton_of`), or zeros of the block's output shape when the block changes the
    shape (so that whatever the model computes between blocks still runs). Its values never
    reach the block being captured: the block just before it is a :class:`Replay` of the real
    outputs. Attributes a model reads from its blocks come from ``block``."""

    def __init__(self, block: nn.Module, skeleton: Any, tail: torch.Size) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self.skeleton, self.tail = skeleton, tail

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Any:
        if hidden.shape[1:] != self.tail:
            hidden = hidden.new_zeros((hidden.shape[0], *self.tail))
        return with_hidden(hidden, self.skeleton)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_block" not in self.__dict__:
                raise
            return getattr(self.__dict__["_block"], name)


def skeleton_of(output: Any) -> Any:
    """A block output's structure without its hidden states (``None`` for a plain tensor),
    for :func:`with_hidden` to rebuild an output around other hidden states."""
    return with_hidden(None, output)


@contextlib.contextmanager
def standing_in(
    model: nn.Module,
    names: Sequence[str],
    blocks: Sequence[nn.Module],
    outputs: list[Tensor],
    skeletons: Sequence[Any],
    tails: Sequence[torch.Size],
) -> Iterator[None]:
    """Replace the blocks ``names`` of ``model`` while in the context: the last by a
    :class:`Replay` of ``outputs`` (its hidden states per calibration batch), the others by
    :class:`PassThrough`; the blocks are put back whatever happens."""
    replaced: list[int] = []
    try:
        for j, (name, block) in enumerate(zip(names, blocks, strict=True)):
            if j == len(names) - 1:
                stand_in: nn.Module = Replay(block, [with_hidden(o, skeletons[j]) for o in outputs])
            else:
                stand_in = PassThrough(block, skeletons[j], tails[j])
            replace_module(model, name, stand_in)
            replaced.append(j)
        yield
    finally:
        for j in replaced:
            replace_module(model, names[j], blocks[j])


def model_call(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments ``model`` is called with on ``batch``: those the
    default forward passes it (``calibration.data.forward_call``), or, with a stage's
    ``forward_fn``, those ``forward(model, batch)`` hands to ``model`` (the forward stops there).
    What the stages that trace the model (DepGraph pruning, the joint search's channel groups)
    trace it with, so that any model the calibrated methods run can be traced.

    Raises:
        PPQConfigError: when the default forward cannot call ``model`` on ``batch``
            (``calibration.data.forward_error``), or ``forward_fn`` does not call ``model``.
    """
    if forward is None or forward is default_forward:
        return forward_call(model, batch)
    try:
        captured = capture_block_inputs(model, model, [batch], forward)
    except PPQConfigError as error:
        raise PPQConfigError(
            "the stage reads the arguments the model's forward receives, but forward_fn did not "
            "call the model itself (call model(...) in forward_fn, not a submodule)."
        ) from error
    return captured.args[0], captured.kwargs[0]


def example_call(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """:func:`model_call` cut to the first sample: every tensor argument whose leading
    dimension is the batch size (that of the first tensor argument) keeps its first row.

    Raises:
        PPQConfigError: see :func:`model_call`.
    """
    args, kwargs = model_call(model, batch, forward)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim()]
    size = tensors[0].shape[0] if tensors else None

    def first(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == size:
            return value[:1]
        return value

    return tuple(map(first, args)), {key: first(value) for key, value in kwargs.items()}


def model_input(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> Tensor:
    """The one tensor ``model`` is called with on ``batch`` (:func:`model_call`; ``input_ids``
    when the default forward passes several, as an HF batch with an attention mask): the token
    ids block removal scores the next-token loss on.

    Raises:
        PPQConfigError: as :func:`model_call`, or when the model is called with other than one
            tensor input.
    """
    args, kwargs = model_call(model, batch, forward)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if len(tensors) == 1:
        return tensors[0]
    if forward is not None and forward is not default_forward:
        raise PPQConfigError(
            f"the stage reads the tensor the model's forward receives, but forward_fn called "
            f"it with {len(tensors)} tensors; the stage needs one input tensor (call model(x) "
            "in forward_fn)."
        )
    if isinstance(kwargs.get("input_ids"), Tensor):
        return kwargs["input_ids"]
    raise forward_error(
        model,
        batch,
        f"the stage reads the one tensor the model's forward receives, but the batch gives "
        f"it {len(tensors)}",
    )
