"""Keeping the compressed state intact while ``fit`` updates weights.

A layer pruned or quantized by an earlier stage may still be trainable in ``fit`` (plain
fine-tuning after compression, or a stage fired at a later epoch). Two steps keep the
invariants of ``docs/definitions.md`` through every optimizer step:

1. :func:`mask_gradients`, before the step: the gradients of pruned weights are zeroed, so
   neither the update nor the optimizer's moments touch them;
2. :func:`project_onto_state`, after the step: trainable compressed weights are multiplied by
   their mask (exact zeros even under coupled weight decay) and re-rounded onto their recorded
   grid. A quantized layer fine-tuned this way keeps its grid, so updates smaller than half a
   grid step are lost: use ``QuantizationAwareTraining`` or ``LoRAFineTune`` to train one.

Layers whose weight is frozen (a LoRA base) are left alone, and so are layers whose forward is
a training-time weight transform (QAT, CoDeQ): their stage owns the latent weight until it ends.
"""

from __future__ import annotations

import torch
from torch import nn

from ppq_lightning.compressed.state import compressed_modules, current_mask
from ppq_lightning.modules.transforms import has_weight_transform
from ppq_lightning.modules.views import set_weight_matrix, weight_grad, weight_matrix
from ppq_lightning.ops.projection import project


def _trainable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.requires_grad


def mask_gradients(model: nn.Module) -> int:
    """Zero the gradients of pruned weights; returns how many layers were masked."""
    masked = 0
    for _, module, state in compressed_modules(model):
        grad = weight_grad(module) if _trainable(module) else None
        if grad is None or state.mask is None:
            continue
        grad.mul_(state.mask.to(grad.device))
        masked += 1
    return masked


@torch.no_grad()
def project_onto_state(model: nn.Module) -> int:
    """Put trainable compressed weights back on their mask and grid; returns the layer count."""
    projected = 0
    for _, module, state in compressed_modules(model):
        if not _trainable(module) or has_weight_transform(module):
            continue
        if state.mask is not None or state.grid is not None:
            set_weight_matrix(
                module, project(weight_matrix(module), current_mask(module), state.grid)
            )
        projected += 1
    return projected
