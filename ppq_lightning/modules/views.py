"""Which modules can be compressed, and how their weight and input read as matrices.

Every op works on a weight matrix ``W`` of shape ``(out_features, in_features)`` whose columns
are the layer's inputs: ``nn.Linear.weight`` as is, a convolution's weight (``nn.Conv1d``,
``nn.Conv2d``, ``nn.Conv3d``: :data:`CONVOLUTIONS`) flattened to
``(out_channels, in_channels / groups * prod(kernel_size))`` (the columns of the unfolded
input), and the ``Conv1D`` of Hugging Face GPT-2 (stored ``(in, out)``) transposed. A layer's
input reads as rows ``(n, in_features)`` matching those columns (:func:`input_rows`).

``nn.MultiheadAttention`` computes its query/key/value and output projections from tensors, not
layers: ``modules.attention`` exposes them as ``nn.Linear`` views (``...self_attn.q_proj``,
whose weight is rows of ``in_proj_weight``), which every function here handles as linear layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.offload import released
from ppq_lightning.ops.conv_statistics import ConvGeometry, conv_patches


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions every method takes (transposed convolutions are not among them: their
weight is stored ``(in, out / groups, *kernel)`` and their input is not unfolded patches)."""

COMPRESSIBLE = "nn.Linear, nn.Conv1d/2d/3d or GPT-2's Conv1D"
"""The layer types :func:`is_compressible` takes, in words (for messages)."""


def is_convolution(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution the methods take (:data:`CONVOLUTIONS`)."""
    return isinstance(module, CONVOLUTIONS)


def is_grouped_convolution(module: nn.Module) -> bool:
    """Whether ``module`` is a grouped (or depthwise) convolution of :data:`CONVOLUTIONS`."""
    return is_convolution(module) and module.groups > 1


def is_compressible(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the compression methods handle: ``nn.Linear``, a
    convolution of :data:`CONVOLUTIONS` (1-D, 2-D, 3-D; grouped and depthwise included), or
    Hugging Face's GPT-2 ``Conv1D``."""
    return isinstance(module, (nn.Linear, *CONVOLUTIONS)) or _is_hf_conv1d(module)


def stores_transposed(module: nn.Module) -> bool:
    """Whether ``module.weight`` is stored ``(in, out)`` (the GPT-2 ``Conv1D``): its matrix
    view is the transpose, not a reshape."""
    return _is_hf_conv1d(module)


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


def weight_grad(module: nn.Module) -> Tensor | None:
    """The gradient of ``module.weight`` in its layout, or None when it has none. A layer
    whose weight is a view of another module's parameter (an ``nn.MultiheadAttention``
    projection, ``modules.attention``) reads its rows of that parameter's gradient."""
    own = getattr(module, "weight_grad", None)
    if callable(own):
        return own()
    return module.weight.grad


def set_weight_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Write an ``(out, in)`` matrix into the module's weight (cast to its dtype)."""
    weight_matrix(module).copy_(matrix.to(module.weight.dtype))


def matrix_to_layout(module: nn.Module, matrix: Tensor) -> Tensor:
    """An ``(out, in)`` matrix of any size in the storage layout of ``module``'s class (for a
    layer whose shape changes: ``nn.Linear`` as is, GPT-2 ``Conv1D`` transposed).

    Raises:
        TypeError: for other layer types (a reshaped conv kernel needs its new channel count).
    """
    if isinstance(module, nn.Linear):
        return matrix.contiguous()
    if _is_hf_conv1d(module):
        return matrix.t().contiguous()
    raise TypeError(f"channel pruning supports nn.Linear and GPT-2 Conv1D, not {type(module)}")


def set_features(module: nn.Module) -> None:
    """Make a layer's size attributes agree with its (replaced) weight matrix."""
    out_features, in_features = weight_matrix(module).shape
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_features, in_features
    elif _is_hf_conv1d(module):
        module.nf, module.nx = out_features, in_features


def conv_input(layer: nn.Module, x: Tensor) -> tuple[Tensor, ConvGeometry]:
    """A convolution's input with its padding applied (timm's dynamic "same" padding for
    ``Conv2dSame``, TensorFlow-ported models, else ``layer.padding``), and what the kernel does
    over it: the input of the statistics in ``ops.conv_statistics``. Any of
    :data:`CONVOLUTIONS`: a ``Conv1d`` input ``(B, C, T)`` goes through the same windows as a
    ``Conv2d`` one ``(B, C, H, W)``, with one kernel dimension instead of two.

    Raises:
        PPQConfigError: for string padding (``"same"``) or a padding mode other than zeros,
            whose patches this does not reproduce.
    """
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise PPQConfigError(
            f"a {type(layer).__name__} with padding={layer.padding!r}, "
            f"padding_mode={layer.padding_mode!r} cannot be calibrated (its input patches are "
            "not those of unfold); list it in `ignore`."
        )
    if type(layer).__name__ == "Conv2dSame":  # timm: pads in its forward, then convolves
        from timm.layers.padding import pad_same

        x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    if any(layer.padding):
        # F.pad takes the last dimension first, each as (before, after)
        x = nn.functional.pad(x, [p for p in reversed(layer.padding) for _ in range(2)])
    geometry = ConvGeometry(
        tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation), layer.groups
    )
    return x, geometry


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The input of ``layer`` as rows matching the columns of its weight matrix: ``(n, in)``.

    A convolution's input (any of :data:`CONVOLUTIONS`) is unfolded into the patches its kernel
    sees (``in = C * prod(kernel_size)``, see :func:`conv_input`). A grouped convolution
    (depthwise included) has one input per group: the rows are then ``(groups, n, in)``, group
    ``g``'s patches of its ``C / groups`` channels, matching the columns of the weight rows of
    that group (``out / groups`` consecutive rows). The calibration statistics of a convolution
    do not build these rows (``ops.conv_statistics``); they are the reference those are tested
    against.

    Raises:
        PPQConfigError: for a convolution whose padding :func:`conv_input` refuses.
    """
    if is_convolution(layer):
        patches = conv_patches(*conv_input(layer, x))  # (B, g, cols, L)
        rows = patches.permute(1, 0, 3, 2).flatten(1, 2)  # (g, B*L, cols)
        return rows[0] if layer.groups == 1 else rows
    return x.flatten(0, -2)


def check_finite(
    modules: dict[str, nn.Module | None], what: str, error: type[Exception] = PPQConfigError
) -> None:
    """Refuse layers whose weights hold NaN or Inf (``None`` entries and layers without a
    weight are skipped).

    Args:
        modules: ``{name: layer}`` to check.
        what: the start of the message (``"stage 'P': cannot compress"``).
        error: the exception type to raise.

    Raises:
        error: naming each layer with non-finite weights and how many there are.
    """
    bad = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.is_floating_point():
            count = int((~weight.detach().isfinite()).sum())
            released(module)  # weights on disk: its pages leave resident memory again
            if count:
                bad[name] = count
    if bad:
        listed = ", ".join(f"{n} ({c} NaN/Inf)" for n, c in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise error(f"{what} non-finite weights in {len(bad)} layer(s): {listed}{more}.")
