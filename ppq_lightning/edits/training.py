"""Training stages in checkpoints written while they train: how their layers end, and how a
fresh model completes a stage that was still training when its checkpoint was written.

A training stage (LoRA, QAT, CoDeQ, SQS) records its result on its layers only when training
ends. While it trains, every state dict of the module (every checkpoint ``fit`` writes:
``ModelCheckpoint``'s, ``last.ckpt``, ``trainer.save_checkpoint``, weights-only or not) holds
its *training state* (LoRA adapters; latent weights and the quantizer's or posterior's
parameters) and a :class:`~ppq_lightning.compressed.history.FitRecord` under
:data:`~ppq_lightning.compressed.history.FIT_RECORD`, written by the stage: the epoch and step,
every stage of the fit with its status (applied, training, pending), and the training stage's
history entry and layers. A resumed fit (``ckpt_path``) continues the training state exactly.

A fresh model that loads such a state dict (``edits.enable_state_loading``) completes the
training stage as the model computed at that step (:func:`start_completion` before the load,
:func:`finish_completion` after): LoRA adapters are re-injected and kept unmerged; QAT, CoDeQ and
SQS layers get the weight their forward used then, exactly on its grid, with the grid and mask
recorded, as the stage records them at the end of training (the callbacks run the same
functions, :data:`COMPLETIONS`). Each completed entry carries ``mid_fit`` (epoch, step). Stages
still pending are not applied; a :class:`MidFitCheckpointWarning` says what the checkpoint holds
and which stages had not fired.

A fit without a training stage writes the record too while one of its stages has not fired
(``at_epoch``, ``at_step``) or not finished its ramp (``MagnitudePruning(ramp=...)``), without
the ``training`` part. A fresh model that loads it is the model the fit computed then: the stages
applied by then; a ramp's zeros so far, with the masks the ramp recorded on its layers (so every
later stage and fine-tune keeps them at zero), but not the ramp's stage, which had not reached
its sparsity (running it on the loaded model prunes to that sparsity at once, keeping those
masks). The same warning says so. A fit resumed from it (:func:`fitting` says the model is being
fit) loads it silently.
"""

from __future__ import annotations

import warnings
import weakref
import zlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.history import (
    APPLIED,
    PENDING,
    RAMPING,
    TRAINING,
    FitRecord,
    FitStage,
    HistoryEntry,
)
from ppq_lightning.compressed.state import (
    current_mask,
    record_grid,
    record_mask,
    record_stage,
)
from ppq_lightning.edits.lora import BASE_SUFFIX, keep_adapter, replay_lora_adapter
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.transforms import has_weight_transform
from ppq_lightning.modules.tree import find_module
from ppq_lightning.modules.views import as_matrix, set_weight_matrix, weight_matrix
from ppq_lightning.ops.dead_zone import DeadZoneQuantizer, dead_zone_grid
from ppq_lightning.ops.quant_grid import compute_grid
from ppq_lightning.ops.reconstruction import relative_weight_error
from ppq_lightning.ops.sqs import SQSPosterior, sqs_grid

QUANTIZER_NAME = "ppq_dead_zone"  # the child of a CoDeQ layer holding its learnable parameters
POSTERIOR_NAME = "ppq_sqs"  # the child of an SQS layer holding its posterior parameters


class MidFitCheckpointWarning(UserWarning):
    """A checkpoint written during ``fit`` was loaded into a fresh model: it holds the stages
    applied by then and the training stage as it was at that step, not the stages pending."""


def latent_weight(module: nn.Module) -> Tensor:
    """A trained layer's latent weight ``(out, in)``, float32, with its recorded mask's zeros
    exact (a training stage re-applies them after every step; kept whatever happened since)."""
    w = weight_matrix(module).float()
    mask = current_mask(module)
    return w if mask is None else w * mask.to(w.device)


# -- QAT ------------------------------------------------------------------------------------
def finalise_qat(module: nn.Module, entry: HistoryEntry) -> dict[str, float]:
    """End QAT on one layer: its weight becomes the min-max fake quantization of its latent
    weight (``entry``'s ``bits``, ``group_size``, ``symmetric``), the grid is recorded (replacing
    an earlier one) and ``entry`` appended to its history.

    Returns:
        ``bits`` and ``weight_error`` (``||Q(W) - W||^2 / ||W||^2``).
    """
    bits = int(entry["bits"])
    w = latent_weight(module)
    grid = compute_grid(w, bits, entry.get("group_size"), bool(entry.get("symmetric", False)))
    q = grid.fake_quantize(w)
    error = relative_weight_error(w, q)
    set_weight_matrix(module, q)
    record_grid(module, grid)
    record_stage(module, entry)
    return {"bits": float(bits), "weight_error": error}


# -- CoDeQ ----------------------------------------------------------------------------------
def attach_dead_zone_quantizer(
    module: nn.Module,
    bits: int,
    init_dead_zone: float | None,
    temperature: float,
    learn_bits: bool,
) -> DeadZoneQuantizer:
    """Give ``module`` the child :data:`QUANTIZER_NAME` holding CoDeQ's learnable parameters
    (see ``ops.dead_zone.DeadZoneQuantizer``), on the module's device; return it."""
    quantizer = DeadZoneQuantizer(bits, init_dead_zone, temperature, learn_bits)
    module.add_module(QUANTIZER_NAME, quantizer.to(module.weight.device))
    return quantizer


def finalise_dead_zone(module: nn.Module, entry: HistoryEntry) -> dict[str, float]:
    """End CoDeQ on one layer (its child :data:`QUANTIZER_NAME` stays): its weight becomes
    ``q(W)`` (exactly 0 in the dead zone, on the grid outside), the symmetric per-channel grid
    of the learned bits and the mask ``q(W) != 0`` (with any earlier mask) are recorded, and
    ``entry`` with the learned ``sparsity`` is appended to its history.

    Returns:
        ``sparsity``, ``bits``, ``dead_zone`` (``d / max|w|``) and ``weight_error``.
    """
    quantizer: DeadZoneQuantizer = module.get_submodule(QUANTIZER_NAME)
    w = latent_weight(module)
    bits = quantizer.integer_bits()
    q = quantizer(w)
    error = relative_weight_error(w, q)
    set_weight_matrix(module, q)
    record_grid(module, dead_zone_grid(w, bits))
    state = record_mask(module, q != 0)
    sparsity = 1 - state.mask.float().mean().item()
    record_stage(module, {**entry, "sparsity": sparsity})
    return {
        "sparsity": sparsity,
        "bits": float(bits),
        "dead_zone": quantizer.dead_zone(),
        "weight_error": error,
    }


# -- SQS ------------------------------------------------------------------------------------
def attach_sqs_posterior(
    module: nn.Module,
    name: str,
    bits: int,
    init_inclusion: float,
    sigma: float,
    logit_scale: float,
) -> SQSPosterior:
    """Give the layer ``name`` (``module``) the child :data:`POSTERIOR_NAME` holding its SQS
    posterior (see ``ops.sqs.SQSPosterior``; its grid step from the current weight, its noise
    seed from ``name``); return it."""
    w = as_matrix(module, module.weight.detach()).float()
    posterior = SQSPosterior(w, bits, init_inclusion, sigma, logit_scale)
    posterior.layer_seed = zlib.crc32(name.encode())
    module.add_module(POSTERIOR_NAME, posterior)
    return posterior


def finalise_sqs(module: nn.Module, entry: HistoryEntry) -> dict[str, float]:
    """End SQS on one layer (its child :data:`POSTERIOR_NAME` stays): the posterior collapses
    (``pi < 1/2``: exact zeros; else the most likely level, on the grid), the grid and the mask
    of non-zero weights (with any earlier mask) are recorded, and ``entry`` with the
    ``sparsity`` is appended to its history.

    Returns:
        ``sparsity``, ``bits``, ``levels_used`` and ``weight_error``.
    """
    posterior: SQSPosterior = module.get_submodule(POSTERIOR_NAME)
    bits = int(entry["bits"])
    w = latent_weight(module)
    q, _ = posterior.collapse(w)
    error = relative_weight_error(w, q)
    set_weight_matrix(module, q)
    record_grid(module, sqs_grid(posterior.scale, bits))
    state = record_mask(module, q != 0)
    sparsity = 1 - state.mask.float().mean().item()
    record_stage(module, {**entry, "sparsity": sparsity})
    levels = torch.unique(torch.round(q / posterior.scale)).numel()
    return {
        "sparsity": sparsity,
        "bits": float(bits),
        "levels_used": float(levels),
        "weight_error": error,
    }


def remove_child(module: nn.Module, child: str) -> list[nn.Parameter]:
    """Remove the child ``child`` of ``module`` (a stage's parameters); return its parameters."""
    removed = module._modules.pop(child, None)
    return [] if removed is None else list(removed.parameters())


# -- completing a stage that was training when its checkpoint was written ------------------
class Completion(NamedTuple):
    """How a fresh model completes a training stage's layer from a checkpoint written while it
    trained. Each function takes ``(model, layer name, entry)``.

    Attributes:
        live: whether ``model`` trains the layer itself (a fit resumed with ``ckpt_path``: the
            stage set the layer up before the restore, and its training state loads as is).
        attach: before the load, give the layer what holds the stage's saved parameters.
        finalise: after the load, write and record the layer as the stage's end does.
        result: what the completed layer holds, for messages.
    """

    live: Callable[[nn.Module, str, HistoryEntry], bool]
    attach: Callable[[nn.Module, str, HistoryEntry], None]
    finalise: Callable[[nn.Module, str, HistoryEntry], None]
    result: str


def _layer(model: nn.Module, name: str) -> nn.Module:
    layer = find_module(model, name)
    if layer is None:
        raise PPQConfigError(
            f"the checkpoint records the training stage's layer {name}, which this "
            f"{type(model).__name__} lacks: load it into the module class that wrote it."
        )
    return layer


def _transformed(model: nn.Module, name: str, entry: HistoryEntry) -> bool:
    return has_weight_transform(_layer(model, name))


def _no_child(model: nn.Module, name: str, entry: HistoryEntry) -> None:
    _layer(model, name)


def _finalised(
    finalise: Callable[[nn.Module, HistoryEntry], dict[str, float]], child: str | None
) -> Callable[[nn.Module, str, HistoryEntry], None]:
    def run(model: nn.Module, name: str, entry: HistoryEntry) -> None:
        layer = _layer(model, name)
        with torch.no_grad():
            finalise(layer, entry)
        if child is not None:
            remove_child(layer, child)

    return run


def _lora_live(model: nn.Module, name: str, entry: HistoryEntry) -> bool:
    return find_module(model, name + BASE_SUFFIX) is not None


def _lora_attach(model: nn.Module, name: str, entry: HistoryEntry) -> None:
    _layer(model, name)
    replay_lora_adapter(model, name + BASE_SUFFIX, entry)


def _lora_finalise(model: nn.Module, name: str, entry: HistoryEntry) -> None:
    keep_adapter(_layer(model, name), entry)


def _attach_quantizer(model: nn.Module, name: str, entry: HistoryEntry) -> None:
    attach_dead_zone_quantizer(
        _layer(model, name),
        int(entry["bits"]),
        entry.get("init_dead_zone"),
        float(entry["temperature"]),
        bool(entry["learn_bits"]),
    )


def _attach_posterior(model: nn.Module, name: str, entry: HistoryEntry) -> None:
    attach_sqs_posterior(
        _layer(model, name),
        name,
        int(entry["bits"]),
        float(entry["init_inclusion"]),
        float(entry["sigma"]),
        float(entry["logit_scale"]),
    )


_ON_GRID = "the weights its forward used then, written onto the recorded grid"
COMPLETIONS: dict[str, Completion] = {
    "lora": Completion(_lora_live, _lora_attach, _lora_finalise, "its adapters kept, unmerged"),
    "qat": Completion(_transformed, _no_child, _finalised(finalise_qat, None), _ON_GRID),
    "dead_zone": Completion(
        _transformed, _attach_quantizer, _finalised(finalise_dead_zone, QUANTIZER_NAME), _ON_GRID
    ),
    "sqs": Completion(
        _transformed, _attach_posterior, _finalised(finalise_sqs, POSTERIOR_NAME), _ON_GRID
    ),
}
"""A training stage's ``completion`` (its class attribute, recorded in the fit record) -> how
a fresh model completes it."""


_FITS: weakref.WeakKeyDictionary[nn.Module, Callable[[], bool]] = weakref.WeakKeyDictionary()


def mark_fitting(model: nn.Module, running: Callable[[], bool] | None) -> None:
    """Say whether a Trainer is fitting ``model`` with its compression stages (so a state dict
    with a fit record that it loads is a resume, not a fresh model's load).

    Args:
        model: the module the fit trains (the one whose state dicts carry the record).
        running: tells whether that fit is still running (checked at load time); None: the
            fit is over.
    """
    if running is None:
        _FITS.pop(model, None)
    else:
        _FITS[model] = running


def fitting(model: nn.Module) -> bool:
    """Whether a running ``fit`` with compression stages trains ``model`` (see
    :func:`mark_fitting`)."""
    running = _FITS.get(model)
    return running is not None and bool(running())


class PendingCompletion(NamedTuple):
    """A fit record being loaded into a fresh model: the layers still to complete after the
    load, with the completion and the entry to record (``mid_fit`` included)."""

    record: FitRecord
    completion: Completion | None
    entry: HistoryEntry | None
    layers: list[str]


def start_completion(model: nn.Module, record: FitRecord) -> PendingCompletion | None:
    """Before ``model`` loads a state dict carrying ``record``: give the layers of the stage
    that was training what holds its saved parameters (the LoRA adapters, CoDeQ's quantizer,
    SQS's posterior), unless ``model`` trains them itself (a resumed fit).

    Returns:
        What :func:`finish_completion` completes after the load; None when ``model`` trains
        every such layer itself, or for a record without a training stage when a running fit
        of ``model`` restores it (:func:`fitting`): nothing to complete, nothing to say.

    Raises:
        PPQConfigError: for a record that is not a fit record, a completion this version does
            not know, or a recorded layer ``model`` lacks.
    """
    if not isinstance(record, dict) or not isinstance(record.get("stages"), list):
        raise PPQConfigError(
            f"the state dict's {type(record).__name__} under the fit record's key is not a "
            "fit record (epoch, step, stages): it was not written by ppq-lightning."
        )
    training = record.get("training")
    if training is None:
        return None if fitting(model) else PendingCompletion(record, None, None, [])
    kind = training.get("completion")
    if kind not in COMPLETIONS:
        raise PPQConfigError(
            f"the checkpoint was written while a stage trained whose completion {kind!r} this "
            f"version does not know (known: {', '.join(sorted(COMPLETIONS))})."
        )
    completion = COMPLETIONS[kind]
    entry: HistoryEntry = {
        **training["entry"],
        "mid_fit": {"epoch": int(record["epoch"]), "step": int(record["step"])},
    }
    layers = [n for n in training["layers"] if not completion.live(model, n, entry)]
    if not layers:
        return None
    for name in layers:
        completion.attach(model, name, entry)
    return PendingCompletion(record, completion, entry, layers)


def finish_completion(model: nn.Module, pending: PendingCompletion) -> None:
    """After ``model`` loaded the state dict: write and record every layer of the stage that was
    training as its end does (from the loaded training state), and warn with what the
    checkpoint holds (:func:`describe_fit`)."""
    if pending.completion is not None and pending.entry is not None:
        for name in pending.layers:
            pending.completion.finalise(model, name, pending.entry)
    warnings.warn(describe_fit(pending.record), MidFitCheckpointWarning, stacklevel=2)


def _label(stage: FitStage) -> str:
    return f"{stage.get('method', '?')} {stage.get('name', '?')!r}"


def _ramped(stage: FitStage) -> str:
    ramp = stage.get("ramp") or {}
    reached = ramp.get("sparsity")
    so_far = "?" if reached is None else f"{reached:.3f}"
    return (
        f"{_label(stage)} mid-ramp (sparsity {so_far} so far, {ramp.get('target')} when it "
        f"ends at step {ramp.get('end_step')}: its masks so far are recorded and kept, the "
        "stage is not)"
    )


def _held(stage: FitStage, when: str) -> str:
    status = stage.get("status")
    if status == RAMPING:
        return _ramped(stage)
    return _label(stage) + (f" (training, {when})" if status == TRAINING else "")


def describe_fit(record: FitRecord) -> str:
    """What a checkpoint written during ``fit`` holds, in one message: when it was taken, the
    stages that had not fired or finished their ramp, the stages it holds and the one that was
    training."""
    when = f"epoch {record['epoch']}, step {record['step']}"
    stages = record["stages"]
    pending = [_label(s) for s in stages if s.get("status") == PENDING]
    ramping = [_label(s) for s in stages if s.get("status") == RAMPING]
    held = [_held(s, when) for s in stages if s.get("status") in (APPLIED, TRAINING, RAMPING)]
    text = f"this checkpoint was taken during fit at {when}"
    text += f", before {', '.join(pending)} fired" if pending else ""
    text += f", while {', '.join(ramping)} ramped" if ramping else ""
    text += f"; it holds {', '.join(held) if held else 'no compression stage'}."
    training = record.get("training")
    completion = COMPLETIONS.get(training["completion"]) if training is not None else None
    if completion is not None:
        text += (
            " The training stage is loaded as the model computed at that step "
            f"({completion.result}; its history entry records mid_fit)."
        )
    if pending or ramping:
        text += (
            " The stages that had not fired or finished are not applied: run them on the "
            "loaded model (e.g. Trainer(callbacks=[...]).validate(model)), or save a "
            "checkpoint after fit "
            "(trainer.save_checkpoint)."
        )
    return text
