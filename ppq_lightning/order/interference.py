"""Interference-aware predictors: rank orders by the error they induce, evaluating none.

``interference``: the layer output error of each order on the dense calibration inputs.
``calibration_kl``: the KL divergence of each order's outputs from the dense model's on the
calibration batches (a forward pass of each candidate over calibration data, never over the
evaluation data): it also sees how errors grow through the network.

One forward pass of the dense model over the calibration batches gives every target layer's
input Gram matrix ``H = X^T X`` (the statistic GPTQ uses). Each candidate order is then applied
to a copy of the model (shared prefixes once), and scored by the relative output error of its
layers on those dense inputs::

    E(order) = sum_l tr(dW_l H_l dW_l^T) / sum_l tr(W_l H_l W_l^T),   dW_l = W_l' - W_l

Lower is better. Unlike a ranking by single-stage intensity (PIH), ``E`` sees the interference
of the stages: pruning after quantization chooses among tied quantized values and cannot move
the survivors, quantization after pruning re-fits its grid to the survivors, and a calibrated
second stage (GPTQ after SparseGPT) compensates the first one's error on these very inputs.
What it does not see: how errors grow through the following layers, and metrics that are not
a monotone function of the layers' output errors.

The cost is one calibration forward pass (``block_passes``: the model's blocks, once), the
stage applications of every order (prefixes reused; calibrated stages make their own passes),
and no evaluation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.calibration.engine import observing
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.offload import copy_model
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.order.grammar import all_orders
from ppq_lightning.order.prediction import Ranking
from ppq_lightning.order.stage import Stage
from ppq_lightning.order.walk import walk_orders

ForwardFn = Callable[[nn.Module, Any], Any]


def dense_hessians(
    model: nn.Module, batches: Sequence[Any], forward: ForwardFn | None = None
) -> dict[str, Tensor]:
    """``X^T X / n`` of every target layer's input over ``batches``, in one forward pass
    (``forward(model, batch)``, default ``calibration.data.default_forward``)."""
    layers = resolve_targets(model)
    statistics = LayerStatistics("hessian")
    forward = forward or default_forward
    with torch.no_grad(), evaluating(model), observing(layers, statistics.observe):
        for batch in batches:
            forward(model, batch)
    return statistics.take([name for name in layers if statistics.has(name)])


def output_error(dense: dict[str, Tensor], model: nn.Module, hessians: dict[str, Tensor]) -> float:
    """``E``: the relative output error of ``model``'s target layers on the dense inputs.

    Raises:
        PPQConfigError: when a stage changed a layer's shape or removed it.
    """
    layers = resolve_targets(model)
    error, norm = 0.0, 0.0
    for name, h in hessians.items():
        layer = layers.get(name)
        w0 = dense[name]
        if layer is None or weight_matrix(layer).shape != w0.shape:
            raise PPQConfigError(
                f"predictor='interference' compares layers before and after each order, but "
                f"{name} was removed or reshaped (structural stages such as BlockRemoval or "
                "ChannelPruning): use predictor='pih', 'pih_cer' or 'prune_first'."
            )
        delta = weight_matrix(layer).float() - w0
        error += float(((delta @ h) * delta).sum())
        norm += float(((w0 @ h) * w0).sum())
    return error / norm if norm else 0.0


def _logits(model: nn.Module, batch: Any, forward: ForwardFn | None = None) -> Tensor:
    output = (forward or default_forward)(model, batch)
    return (output.logits if hasattr(output, "logits") else output).float()


def output_kl(
    model: nn.Module,
    batches: Sequence[Any],
    dense: list[Tensor],
    forward: ForwardFn | None = None,
) -> float:
    """Mean KL(dense || model) of the output distributions over ``batches`` (per position)."""
    total, count = 0.0, 0
    with torch.no_grad(), evaluating(model):
        for batch, reference in zip(batches, dense, strict=True):
            log_p = torch.log_softmax(reference, dim=-1).flatten(0, -2)
            log_q = torch.log_softmax(_logits(model, batch, forward), dim=-1).flatten(0, -2)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0]
    return total / max(count, 1)


def reference_score(
    module: nn.Module,
    calibration: Sequence[Any],
    score: str = "interference",
    forward: ForwardFn | None = None,
) -> Callable[[nn.Module], float]:
    """One pass of the dense ``module`` over ``calibration``, and the scorer of a compressed
    copy it makes: :func:`output_error` (``"interference"``) or :func:`output_kl`
    (``"calibration_kl"``); ``forward(model, batch)`` calls the model (a stage's
    ``forward_fn``; default ``calibration.data.default_forward``)."""
    if score == "calibration_kl":
        with torch.no_grad(), evaluating(module):
            reference = [_logits(module, batch, forward) for batch in calibration]
        return lambda model: output_kl(model, calibration, reference, forward)
    hessians = dense_hessians(module, calibration, forward)
    layers = resolve_targets(module)
    dense = {name: weight_matrix(layers[name]).detach().float().clone() for name in hessians}
    return lambda model: output_error(dense, model, hessians)


def interference_rankings(
    module: nn.Module,
    stages: Sequence[Stage],
    calibration: Sequence[Any],
    measures: dict[str, Callable[[nn.Module], float]],
    apply: Any = None,
    tail: Sequence[Stage] = (),
) -> dict[str, Ranking | None]:
    """Every order of ``stages`` ranked by each scorer of ``measures`` (name -> scorer from
    :func:`reference_score`), from one set of stage applications (prefixes reused). A scorer
    that does not apply to these stages (``interference`` on reshaped layers) gives None.
    ``tail`` stages (a study's BatchNorm recalibration) run after each order, before scoring."""
    start = time.perf_counter()
    by_name = {stage.name: stage for stage in stages}

    def default_apply(model: nn.Module, stage: Stage) -> None:
        copy.deepcopy(stage).apply(model, dataloader=calibration)

    apply = apply or default_apply
    scores: dict[str, dict[tuple[str, ...], float] | None] = {name: {} for name in measures}

    def visit(model: nn.Module, order: tuple[str, ...], seconds: float) -> None:
        if tail:
            model = copy_model(model)
            for stage in tail:
                with torch.no_grad():
                    apply(model, stage)
        for name, measure in measures.items():
            if scores[name] is None:
                continue
            try:
                scores[name][order] = measure(model)
            except PPQConfigError:
                if len(measures) == 1:
                    raise
                scores[name] = None

    def apply_named(model: nn.Module, name: str) -> None:
        with torch.no_grad():
            apply(model, by_name[name])

    applications = walk_orders(module, all_orders(list(by_name)), apply_named, visit)
    seconds = time.perf_counter() - start
    rankings: dict[str, Ranking | None] = {}
    for name, found in scores.items():
        if found is None:
            rankings[name] = None
            continue
        cost = {
            "evaluations": 0,
            "single_evaluations": 0,
            "applications": applications,
            "calibration_forwards": len(found) if name == "calibration_kl" else 0,
            "seconds": seconds,
        }
        rankings[name] = Ranking(name, sorted(found.items(), key=lambda item: item[1]), cost)
    return rankings


def interference_ranking(
    module: nn.Module,
    stages: Sequence[Stage],
    calibration: Sequence[Any],
    apply: Any = None,
    score: str = "interference",
    tail: Sequence[Stage] = (),
    forward: ForwardFn | None = None,
) -> Ranking:
    """Every order of ``stages`` ranked by its error (no order is evaluated).

    Args:
        module: the dense model (never modified).
        stages: the named stages.
        calibration: calibration batches (the dense pass and the calibrated stages).
        apply: ``apply(model, stage)`` (default: ``stage.apply(model, dataloader=calibration)``
            on a copy of the stage), e.g. a study's own, which counts applications.
        score: ``"interference"`` (:func:`output_error`) or ``"calibration_kl"``
            (:func:`output_kl`).
        tail: stages applied after every order before it is scored (BatchNorm
            recalibration), as a study's ``tail``.
        forward: how to call the model on a batch (``forward(model, batch)``); default
            ``calibration.data.default_forward``.

    Raises:
        PPQConfigError: for stages that reshape layers (``interference``).
    """
    start = time.perf_counter()
    measure = reference_score(module, calibration, score, forward)
    measures = {score: measure}
    ranking = interference_rankings(module, stages, calibration, measures, apply, tail)[score]
    ranking.cost.update(dense_passes=1, seconds=time.perf_counter() - start)
    return ranking
