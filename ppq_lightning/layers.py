"""Which modules can be compressed, and how their weight reads as a matrix ``(out, in)``.

Every op works on a weight matrix ``W`` of shape ``(out_features, in_features)`` whose columns
are the layer's inputs: ``nn.Linear.weight`` as is, ``nn.Conv2d.weight`` flattened to
``(out_channels, in_channels * kh * kw)`` (the columns of the unfolded input), and the
``Conv1D`` of Hugging Face GPT-2 (stored ``(in, out)``) transposed.
"""

from __future__ import annotations

from torch import Tensor, nn


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_compressible(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the compression methods handle."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or _is_hf_conv1d(module)


def as_matrix(module: nn.Module, tensor: Tensor) -> Tensor:
    """View a tensor in the layout of ``module.weight`` (its mask, say) as ``(out, in)``."""
    if _is_hf_conv1d(module):
        return tensor.t()  # stored (in, out)
    return tensor.flatten(1)


def weight_matrix(module: nn.Module) -> Tensor:
    """A view of the module's weight as ``(out, in)``; writing into it writes the weight."""
    return as_matrix(module, module.weight.data)


def to_weight_layout(module: nn.Module, matrix: Tensor) -> Tensor:
    """Turn an ``(out, in)`` tensor (a mask, say) back into the layout of ``module.weight``."""
    if _is_hf_conv1d(module):
        return matrix.t()
    return matrix.reshape(module.weight.shape)


def set_weight_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Write an ``(out, in)`` matrix into the module's weight (cast to its dtype)."""
    weight_matrix(module).copy_(matrix.to(module.weight.dtype))
