"""A weight transform active during training: the forward of a layer sees ``fn(weight)``.

Training-time compression stages (``QuantizationAwareTraining``, ``DeadZoneQuantization``) keep
a full-precision *latent* weight in ``module.weight`` and let the layer compute with a
fake-quantized copy of it. :func:`attach_weight_transform` replaces the layer's forward by one
that calls ``fn(module.weight)`` and then the layer's own operation (``F.linear``,
a convolution's ``_conv_forward``, or the ``x @ W + b`` of Hugging Face's ``Conv1D``);
:func:`detach_weight_transform` restores the original forward exactly.

Unlike ``torch.nn.utils.parametrize`` nothing is renamed: ``state_dict()`` keeps the key
``...weight`` holding the latent weight, so Hugging Face state dicts and Lightning checkpoints
load as before. While attached, ``module._ppq_weight_transform`` holds ``fn``; the invariant
upkeep of ``ppq_lightning.compressed.upkeep`` leaves such layers to the stage that attached it.
The straight-through estimators the transforms use live in ``ppq_lightning.ops.ste``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.attention import check_runs_modules
from ppq_lightning.modules.views import COMPRESSIBLE, as_matrix, is_compressible, is_convolution

TRANSFORM_ATTRIBUTE = "_ppq_weight_transform"
WeightTransform = Callable[[Tensor], Tensor]
_SAVED_FORWARD = "_ppq_saved_forward"  # an instance-level forward found at attach time
_NO_FORWARD = object()


def has_weight_transform(module: nn.Module) -> bool:
    """Whether a weight transform is attached to ``module``."""
    return TRANSFORM_ATTRIBUTE in module.__dict__


def transformed_weight(module: nn.Module) -> Tensor:
    """The weight the forward of ``module`` uses now: ``fn(module.weight)`` or the weight."""
    fn = module.__dict__.get(TRANSFORM_ATTRIBUTE)
    return module.weight if fn is None else fn(module.weight)


def _transformed_forward(module: nn.Module, x: Tensor) -> Tensor:
    weight = module.__dict__[TRANSFORM_ATTRIBUTE](module.weight)
    if is_convolution(module):  # nn.Conv1d/2d/3d: their own padding, stride, groups
        return module._conv_forward(x, weight, module.bias)
    # nn.Linear, and HF Conv1D (weight stored (in, out)): both are x @ W.T + b with W (out, in)
    return F.linear(x, as_matrix(module, weight), module.bias)


def attach_weight_transform(module: nn.Module, fn: WeightTransform) -> None:
    """Make the forward of ``module`` use ``fn(module.weight)`` instead of ``module.weight``.

    Args:
        module: an ``nn.Linear``, ``nn.Conv1d``/``Conv2d``/``Conv3d`` or Hugging Face ``Conv1D``.
        fn: maps the weight (in its stored layout) to a tensor of the same shape; called on
            every forward, so gradients reach the latent weight through it. Keep it picklable
            (a module-level function or a ``functools.partial`` of one) if the model is
            pickled or deep-copied while it is attached.

    A projection of an ``nn.MultiheadAttention`` (``modules.attention``) gets the transform
    too: the attention computes through its projections while one is attached.

    Raises:
        PPQConfigError: when ``module`` is not a supported layer, already has a transform
            (two training stages on one layer at once), or is a projection of an attention
            subclass whose own forward reads the weights as tensors.
    """
    if not is_compressible(module):
        raise PPQConfigError(
            f"a weight transform needs an {COMPRESSIBLE} layer, not {type(module).__name__}."
        )
    if has_weight_transform(module):
        raise PPQConfigError(
            f"{type(module).__name__} already has a weight transform attached: one training "
            "stage (QAT, CoDeQ) per layer at a time."
        )
    check_runs_modules({type(module).__name__: module}, "a training-time weight transform")
    # kept out of nn.Module's registries (a module-valued fn must not add state-dict keys)
    module.__dict__[_SAVED_FORWARD] = module.__dict__.get("forward", _NO_FORWARD)
    module.__dict__[TRANSFORM_ATTRIBUTE] = fn
    module.__dict__["forward"] = partial(_transformed_forward, module)


def detach_weight_transform(module: nn.Module) -> WeightTransform | None:
    """Restore the original forward of ``module``; returns the transform (None if none)."""
    fn = module.__dict__.pop(TRANSFORM_ATTRIBUTE, None)
    if fn is None:
        return None
    saved = module.__dict__.pop(_SAVED_FORWARD, _NO_FORWARD)
    if saved is _NO_FORWARD:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = saved
    return fn
