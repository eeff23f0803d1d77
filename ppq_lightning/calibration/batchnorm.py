"""Re-estimating BatchNorm statistics after compression (as OBC's post-processing and NNCF's
BatchNorm adaptation do): a compressed network's activations drift from the running means and
variances its BatchNorm layers learned on the dense one; recomputing them on calibration data
recovers much of the accuracy lost, at the cost of forward passes only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.errors import PPQConfigError


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats
    }


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    layers: dict[str, _BatchNorm] | None = None,
) -> dict[str, dict[str, float]]:
    """Reset the running statistics of ``layers`` (default: all) and re-estimate them as the
    exact average over ``batches`` (cumulative moving average, ``momentum=None``), with every
    other module in eval mode; the modes and momenta are restored afterwards.

    Returns:
        Per layer: ``mean_shift`` and ``var_ratio``, how far the new statistics moved
        (``||mu' - mu|| / ||mu||`` and ``mean(var' / var)``).

    Raises:
        PPQConfigError: when the model has no such layer or ``batches`` is empty.
    """
    layers = batchnorm_layers(model) if layers is None else layers
    if not layers:
        raise PPQConfigError(
            "BatchNorm recalibration found no BatchNorm layer that tracks running statistics."
        )
    batches = list(batches)
    if not batches:
        raise PPQConfigError("BatchNorm recalibration needs calibration batches; none were given.")
    before = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in layers.items()}
    momenta = {n: bn.momentum for n, bn in layers.items()}
    with evaluating(model):
        for bn in layers.values():
            bn.reset_running_stats()
            bn.momentum = None  # cumulative: the exact mean over the batches
            bn.train()
        try:
            for batch in batches:
                forward(model, batch)
        finally:
            for name, bn in layers.items():
                bn.momentum = momenta[name]
    metrics = {}
    for name, bn in layers.items():
        mean, var = before[name]
        shift = (bn.running_mean - mean).norm() / mean.norm().clamp_min(1e-12)
        ratio = (bn.running_var / var.clamp_min(1e-12)).mean()
        metrics[name] = {"mean_shift": float(shift), "var_ratio": float(ratio)}
    return metrics
