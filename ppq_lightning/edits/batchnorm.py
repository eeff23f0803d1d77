"""Folding BatchNorm into the convolution before it (the edit of ``FoldBatchNorm``).

A convolution followed directly by BatchNorm computes, in eval mode, the same as one
convolution with weight ``W * gamma / sigma`` (per output channel) and bias
``beta + (b - mu) * gamma / sigma`` (``torch.nn.utils.fusion.fuse_conv_bn_weights``).
Quantizing the folded weight is what an integer runtime executes; quantizing before folding
leaves the BatchNorm scale outside the grid. The pairs are found from one forward pass (a
BatchNorm whose input is the very output of a convolution); the BatchNorm is replaced by
``nn.Identity`` (timm's ``BatchNormAct2d`` by its dropout and activation), and the conv records
the edit so that a fresh model is folded the same way before a state dict is loaded into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.produced import ProducedBy
from ppq_lightning.modules.tree import replace_module

FOLDED_BATCHNORM = "fold_batchnorm"


def conv_batchnorm_pairs(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] = default_forward
) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` for every BatchNorm whose input is the output of a
    ``Conv2d``, from one forward pass of ``batch`` (in eval mode; hooks removed after).

    The BatchNorm's input must be the very tensor the convolution returned, unmodified: a
    tensor that merely reuses the id of a freed convolution output, or a convolution output
    changed in place since (``ReLU(inplace=True)`` between them), is no pair
    (:class:`~ppq_lightning.modules.produced.ProducedBy`).

    Args:
        model: the model (names are relative to it).
        batch: one batch ``forward`` accepts.
        forward: how to call the model on ``batch``.
    """
    outputs: ProducedBy[str] = ProducedBy()
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                outputs.record(output, name)

        return hook

    def bn_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            source = outputs.get(args[0]) if args else None
            if source is not None and (source, name) not in pairs:
                pairs.append((source, name))

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook(name)))
            elif isinstance(module, _BatchNorm):
                handles.append(module.register_forward_pre_hook(bn_hook(name)))
        with torch.no_grad(), evaluating(model):
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _without_norm(bn: nn.Module) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or timm BatchNormAct2d's dropout and act."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(act, nn.Module):
        return nn.Sequential(drop if isinstance(drop, nn.Module) else nn.Identity(), act)
    return nn.Identity()


def check_foldable(model: nn.Module, conv_name: str) -> None:
    """Refuse folding into a quantized convolution: the per-channel scaling would move its
    weights off their grid (fold before quantizing).

    Raises:
        PPQConfigError: naming the layer and its stages.
    """
    state = get_state(model.get_submodule(conv_name))
    if state is not None and state.grid is not None:
        raise PPQConfigError(
            f"{conv_name} is quantized (stages {state.stages}): fold BatchNorm before "
            "quantizing (FoldBatchNorm first in the order)."
        )


def fold_pair(model: nn.Module, conv_name: str, bn_name: str, entry: HistoryEntry) -> None:
    """Fold the BatchNorm ``bn_name`` into the convolution ``conv_name`` and record the edit.

    Raises:
        PPQConfigError: as :func:`check_foldable`.
    """
    check_foldable(model, conv_name)
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    conv.weight, conv.bias = weight, bias  # the same zeros where the weight was pruned
    replace_module(model, bn_name, _without_norm(bn))
    record_stage(conv, {**entry, "edit": FOLDED_BATCHNORM, "batchnorm": bn_name})


def replay_fold(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Give a fresh model the structure of a folded one: the convolution ``owner`` a bias, the
    BatchNorm it absorbed replaced (values come from the state dict loaded afterwards)."""
    conv = model.get_submodule(owner)
    if conv.bias is None:
        like = conv.weight
        conv.bias = nn.Parameter(
            torch.zeros(conv.out_channels, dtype=like.dtype, device=like.device)
        )
    name = entry["batchnorm"]
    replace_module(model, name, _without_norm(model.get_submodule(name)))
