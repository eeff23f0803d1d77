"""Calibration data: where the batches come from when a stage runs inside a Trainer, and how a
batch is fed to the model.

The default forward (:func:`default_forward`) reads the model's forward signature
(``inspect.signature``) and calls it on the common shapes of batch: a tensor (``model(x)``), a
dict (``model(**batch)``, keys the forward does not take left out), a tuple of inputs followed by
labels (``model(x)``, ``model(inputs, target)``: as many leading items as the forward has
required inputs). A batch it cannot map onto the signature is refused before the model runs,
with an error naming the module, its forward, the batch's structure and the ``forward_fn`` that
says how to call it.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from ppq_lightning.calibration.distributed import shard, world
from ppq_lightning.errors import PPQConfigError, check_int

FORWARD_FN_HELP = (
    "pass the stage a `forward_fn(model, batch)` that calls the model on a batch, e.g. "
    "GPTQ(bits=4, forward_fn=lambda model, batch: model(batch['image'])) "
    "(or set stage.forward_fn on a built stage; OrderStudy(forward_fn=...) for a study)"
)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_num_batches(value: int) -> int:
    """Validate ``num_calibration_batches``: an integer >= 1."""
    return check_int("num_calibration_batches", value, minimum=1)


def batch_input(batch: Any) -> Any:
    """What a one-input model is called with: a tensor batch, ``batch["input_ids"]``, or
    ``batch[0]`` (how ``CausalLMModule`` reads its token ids; stages call the model through
    :func:`default_forward`, which reads the forward's signature)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise PPQConfigError(
                f"a batch is a dict with keys {sorted(batch)}; expected 'input_ids' (a tensor "
                f"batch or a list/tuple whose first item is the input work as they are), or "
                f"{FORWARD_FN_HELP}."
            )
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise PPQConfigError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: expected a "
        f"tensor, a dict with 'input_ids' or a non-empty list/tuple, or {FORWARD_FN_HELP}."
    )


def describe_batch(batch: Any, depth: int = 0) -> str:
    """The structure of ``batch`` in one line: ``dict(image: Tensor[4, 3, 32, 32] float32,
    label: Tensor[4] int64)``, ``tuple(Tensor[2, 8] int64, Tensor[2, 8] int64)``."""
    if isinstance(batch, Tensor):
        return f"Tensor{list(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        items = [f"{key}: {describe_batch(value, depth + 1)}" for key, value in batch.items()]
        return f"{type(batch).__name__}({', '.join(items[:8])}{', ...' if len(items) > 8 else ''})"
    if isinstance(batch, (list, tuple)):
        items = [describe_batch(value, depth + 1) for value in batch[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__}({', '.join(items)}{more})"
    return type(batch).__name__


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C-implemented forward: no signature to read
        return None


def _forward_text(model: nn.Module, signature: inspect.Signature | None) -> str:
    return f"{type(model).__name__}.forward{signature if signature is not None else '(...)'}"


def _example(batch: Any, inputs: int) -> str:
    """A one-line ``forward_fn`` for ``batch`` (its first tensor entries as the inputs)."""
    if isinstance(batch, Mapping):
        keys = [k for k, v in batch.items() if isinstance(v, Tensor)] or list(batch)
        args = ", ".join(f"batch[{k!r}]" for k in keys[: max(inputs, 1)])
    elif isinstance(batch, (list, tuple)):
        args = ", ".join(f"batch[{i}]" for i in range(max(inputs, 1)))
    else:
        args = "batch"
    return f"forward_fn=lambda model, batch: model({args})"


def forward_error(model: nn.Module, batch: Any, reason: str) -> PPQConfigError:
    """The error of a batch the default forward cannot feed to ``model``: the module, its
    forward signature, the batch's structure, why, and the ``forward_fn`` that fixes it."""
    signature = _signature(model)
    required = (
        0
        if signature is None
        else sum(
            p.kind in _POSITIONAL and p.default is p.empty for p in signature.parameters.values()
        )
    )
    return PPQConfigError(
        f"cannot call {type(model).__name__} on a batch: {reason}. Its forward is "
        f"{_forward_text(model, signature)}; the batch is {describe_batch(batch)}. Say how the "
        f"model is called: {_example(batch, required)} (passed to the stage, e.g. "
        f"GPTQ(bits=4, forward_fn=...); or set stage.forward_fn on a built stage; "
        "OrderStudy(forward_fn=...) for a study)."
    )


def forward_call(model: nn.Module, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments :func:`default_forward` calls ``model`` with on
    ``batch``, decided from ``inspect.signature(model.forward)``:

    - a tensor: ``model(batch)``;
    - a dict (any ``Mapping``, e.g. a tokenizer's ``BatchEncoding``): its keys that are
      parameters of the forward (``labels`` and other keys it does not take are left out), all
      of them when the forward takes only ``**kwargs``; a dict whose keys match no parameter
      but which holds ``input_ids`` gives ``model(batch["input_ids"])``;
    - a list or tuple: its first ``n`` items, ``n`` the forward's required positional
      parameters (at least one), the rest being labels: ``(x, y)`` gives ``model(x)`` for
      ``forward(x)`` and ``model(inputs, target)`` for ``forward(inputs, target)``.

    The arguments are checked against the signature (``Signature.bind``) before anything runs.

    Raises:
        PPQConfigError: from :func:`forward_error`, when the batch cannot be mapped onto the
            forward's parameters.
    """
    signature = _signature(model)
    if signature is None:  # nothing to read: the batch's input, as one argument
        return (batch_input(batch),), {}
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is p.empty]
    named = {p.name for p in parameters if p.kind in _NAMED}
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = {}
    if isinstance(batch, Tensor):
        if not positional and not var_positional:
            raise forward_error(model, batch, "the forward takes no positional input")
        args, reason = (batch,), "the batch is one tensor"
    elif isinstance(batch, Mapping):
        keys = sorted(map(str, batch))
        taken = [key for key in batch if key in named]
        args = ()
        if taken:
            kwargs = {key: batch[key] for key in taken}
            reason = f"the batch is a dict with keys {keys}, of which the forward takes {taken}"
        elif var_keyword and not var_positional:  # forward(self, **batch)
            kwargs, reason = dict(batch), f"the batch is a dict with keys {keys}"
        elif "input_ids" in batch:  # forward(ids), or a pass-through forward(*args, **kwargs)
            args, reason = (batch["input_ids"],), "the batch's input_ids is its one input"
        else:
            raise forward_error(
                model,
                batch,
                f"the batch is a dict with keys {keys}, none of which the forward takes by name",
            )
    elif isinstance(batch, (list, tuple)) and batch:
        kind = type(batch).__name__
        if not positional and not var_positional:
            raise forward_error(
                model, batch, f"the batch is a {kind}, and the forward takes no positional input"
            )
        count = max(len(required), 1)
        if len(batch) < count:
            names = ", ".join(p.name for p in required)
            raise forward_error(
                model,
                batch,
                f"the forward needs {count} inputs ({names}), the batch has {len(batch)} item(s)",
            )
        args, reason = tuple(batch[:count]), f"the {kind}'s first {count} item(s) are its inputs"
    else:
        raise forward_error(
            model, batch, f"a batch of type {type(batch).__name__} has no input to read"
        )
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise forward_error(model, batch, f"{reason} ({error})") from None
    return args, kwargs


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch`` as :func:`forward_call` says, with the batch moved to the
    device of the model's parameters.

    Raises:
        PPQConfigError: when the batch cannot be mapped onto the model's forward (see
            :func:`forward_call`); a ``TypeError`` raised inside the forward gets a note
            saying how the model was called and how to call it otherwise.
    """
    args, kwargs = forward_call(model, batch)
    parameter = next(model.parameters(), None)
    if parameter is not None:
        args, kwargs = move_data_to_device((args, kwargs), parameter.device)
    try:
        return model(*args, **kwargs)
    except TypeError as error:
        called = ", ".join([*map(describe_batch, args)] + [f"{k}=..." for k in kwargs])
        error.add_note(
            f"[ppq] the default forward called {type(model).__name__}({called}) on a batch "
            f"{describe_batch(batch)}; if that is not how the model is called, "
            f"{FORWARD_FN_HELP}."
        )
        raise


def as_the_loop_sees(trainer: L.Trainer | None, batch: Any) -> Any:
    """``batch`` converted by the Trainer's precision plugin, as Lightning's loops convert every
    batch before a step (``precision_plugin.convert_input``): with ``precision="bf16-true"`` or
    ``"16-true"`` (a model held in bf16 or fp16) its floating tensors become bf16 or fp16, with
    ``"64-true"`` float64, and with the other precisions nothing changes. Calibration then runs
    the model on what its own steps see (a float32 image batch would not run through a bf16
    convolution at all). Only once the Trainer has converted the module (its strategy's setup):
    before, in a callback's ``setup``, module and batch are both still as the user gave them.
    Without a Trainer the batch is returned as it is.

    Args:
        trainer: the running Trainer, or None (``stage.apply(model, dataloader=...)``).
        batch: one batch of a dataloader.
    """
    if trainer is None:
        return batch
    plugin = trainer.precision_plugin
    wanted = plugin.convert_input(torch.zeros(())).dtype
    module = trainer.lightning_module
    held = next((p.dtype for p in module.parameters() if p.is_floating_point()), wanted)
    return plugin.convert_input(batch) if held == wanted else batch


def first_loader(loaders: Any) -> Any:
    """The first of a Trainer's dataloaders (Lightning gives a list, or a dict of named
    loaders, when there are several), or None when there is none."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


@dataclass(frozen=True)
class CalibrationData:
    """The calibration batches a stage takes, and where they come from.

    Attributes:
        batches: this rank's batches.
        origin: where they come from, in words (``"datamodule.calibration_dataloader()"``,
            ``"the validation dataloader of `validate`"``, ...).
        requested: the batches asked of the dataloader (``num_calibration_batches``; per rank
            when the strategy's sampler already shards the dataloader).
        taken: the batches it gave (fewer than ``requested`` when it is shorter).
        evaluation: whether they come from the data the running Trainer call evaluates on
            (``validate``/``test``/``predict`` without a calibration dataloader).
    """

    batches: list[Any]
    origin: str
    requested: int
    taken: int
    evaluation: bool = False

    @property
    def short(self) -> bool:
        """Whether the dataloader gave fewer batches than ``num_calibration_batches`` asked."""
        return self.taken < self.requested


def _running_loader(trainer: L.Trainer) -> tuple[Any, str]:
    fn = trainer.state.fn
    if fn == TrainerFn.FITTING:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader(), "the datamodule's train_dataloader()"
        source = trainer.fit_loop._data_source  # the dataloaders given to fit()
        return (source.dataloader() if source.is_defined() else None), "the train dataloader"
    if fn == TrainerFn.VALIDATING:
        return trainer.val_dataloaders, "the validation dataloader of `validate`"
    if fn == TrainerFn.TESTING:
        return trainer.test_dataloaders, "the test dataloader of `test`"
    if fn == TrainerFn.PREDICTING:
        return trainer.predict_dataloaders, "the predict dataloader of `predict`"
    return None, "no dataloader"


def _source(
    trainer: L.Trainer | None, dataloader: Iterable[Any] | None
) -> tuple[Iterable[Any], str, bool, bool]:
    """``(loader, origin, sharded by the strategy, evaluation data)`` of a stage's batches."""
    if dataloader is not None:
        return dataloader, "the dataloader given to apply()", False, False
    if trainer is None:
        raise PPQConfigError(
            "this method needs calibration data: call apply(model, "
            "dataloader=...) or run it as a callback of a Trainer."
        )
    datamodule = trainer.datamodule
    if datamodule is not None and callable(getattr(datamodule, "calibration_dataloader", None)):
        origin = "datamodule.calibration_dataloader()"
        return datamodule.calibration_dataloader(), origin, False, False
    loader, origin = _running_loader(trainer)
    loader = first_loader(loader)
    if loader is None:
        raise PPQConfigError(
            "no calibration data: give the datamodule a calibration_dataloader() "
            "or pass dataloaders to the Trainer call."
        )
    return loader, origin, True, trainer.state.fn != TrainerFn.FITTING


def calibration_data(
    trainer: L.Trainer | None, num_batches: int, dataloader: Iterable[Any] | None = None
) -> CalibrationData:
    """The first ``num_batches`` calibration batches for a stage running in ``trainer``, with
    where they come from.

    An explicit ``dataloader`` (from ``stage.apply(model, dataloader=...)``) comes first.
    Taken from ``trainer.datamodule.calibration_dataloader()`` when the datamodule has one, else
    from the running loop's dataloader (the train dataloader in ``fit``; in ``validate``,
    ``test`` and ``predict`` the data the call evaluates on, which :attr:`CalibrationData.
    evaluation` says), so that the callbacks work with a user's own plain dataloaders. A
    dataloader shorter than ``num_batches`` gives all its batches (:attr:`CalibrationData.
    short`; the stage says so).

    Data-parallel (a ``torch.distributed`` group, e.g. ``Trainer(strategy="ddp")``):
    ``num_batches`` counts over all ranks. An explicit dataloader and the calibration dataloader
    are the same on every rank, so each rank takes every ``world_size``-th of the first
    ``num_batches``; the loop's dataloaders are already sharded by the strategy's sampler, so each
    rank takes its first ``ceil(num_batches / world_size)``.

    Raises:
        PPQConfigError: on a bad ``num_batches``; when there is no trainer, no dataloader, it
            is empty, or it has fewer batches than there are ranks.
    """
    check_num_batches(num_batches)
    loader, origin, sharded, evaluation = _source(trainer, dataloader)
    requested = -(-num_batches // world()[1]) if sharded else num_batches
    batches = [as_the_loop_sees(trainer, b) for b in itertools.islice(loader, requested)]
    if not batches:
        raise PPQConfigError(f"the calibration dataloader is empty: {origin} yielded no batch.")
    taken = len(batches)
    return CalibrationData(
        batches if sharded else shard(batches), origin, requested, taken, evaluation
    )


def calibration_batches(
    trainer: L.Trainer | None, num_batches: int, dataloader: Iterable[Any] | None = None
) -> list[Any]:
    """The batches of :func:`calibration_data` (see there).

    Raises:
        PPQConfigError: see :func:`calibration_data`.
    """
    return calibration_data(trainer, num_batches, dataloader).batches


def first_calibration_batch(
    trainer: L.Trainer | None, dataloader: Iterable[Any] | None = None
) -> Any:
    """The first batch a stage would calibrate on (on every rank), to check ahead that the
    model can be called on it.

    Raises:
        PPQConfigError: see :func:`calibration_data`.
    """
    loader, origin, _, _ = _source(trainer, dataloader)
    batch = next(iter(loader), _EMPTY)
    if batch is _EMPTY:
        raise PPQConfigError(f"the calibration dataloader is empty: {origin} yielded no batch.")
    return as_the_loop_sees(trainer, batch)


_EMPTY = object()
