"""Whether the numbers of a compressed layer fit the dtype a file stores them in.

A runtime format stores a grid's scales in a narrower dtype than the model computes in (GGUF:
fp16 ``d`` and ``m``; compressed-tensors with ``dtype="float16"``: fp16 scales and weights). A
scale above the dtype's largest value becomes ``inf`` (its group decodes to inf/NaN); a nonzero
scale below half its smallest subnormal becomes 0 (its group decodes to 0). Both are refused
before anything is written, naming the layer and the value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive number ``dtype`` holds (fp16: 2**-24, about 6e-8)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def check_fits(layer: str, what: str, values: Tensor, dtype: torch.dtype, where: str) -> None:
    """Refuse ``values`` that ``dtype`` turns into inf or NaN, or nonzero values it turns into 0.

    Args:
        layer: the layer's name, for the message.
        what: what the values are (``"scale"``, ``"Q4_1 minimum m = -scale * zero"``).
        values: the values in the precision they were computed in.
        dtype: the dtype the file stores them in.
        where: the format and setting that chose ``dtype`` (``"GGUF's fp16 d"``), for the message.

    Raises:
        PPQConfigError: naming ``layer``, the first value that does not fit, and the range.
    """
    exact = values.detach().double().cpu().flatten()
    stored = exact.to(dtype).double()
    info = torch.finfo(dtype)
    problems = (
        (~torch.isfinite(exact), "is not finite"),
        (~torch.isfinite(stored), f"exceeds the largest {dtype} ({info.max:g}): it would be inf"),
        (
            (stored == 0) & (exact != 0),
            f"is below the smallest {dtype} ({smallest_subnormal(dtype):.3g}): it would be 0 and "
            "its weights would decode to 0",
        ),
    )
    for bad, reason in problems:
        if bool(bad.any()):
            index = int(bad.nonzero()[0])
            count = int(bad.sum())
            raise PPQConfigError(
                f"{layer}: its {what} {float(exact[index]):.6g} (and {count - 1} more) {reason} "
                f"in {where}. Nothing was written. Use format='ppq' (it stores scales exactly), "
                "or a dtype that holds them (compressed-tensors: dtype='float32' or 'bfloat16')."
            )


def check_range(key: str, values: Tensor, dtype: torch.dtype, where: str) -> None:
    """Refuse finite ``values`` that ``dtype`` cannot hold (they would be stored as inf).

    Args:
        key: the tensor's state-dict key, for the message.
        values: the tensor in the model's dtype.
        dtype: the dtype the file stores it in.
        where: the format and setting that chose ``dtype``, for the message.

    Raises:
        PPQConfigError: naming ``key``, its largest magnitude and the dtype's largest value.
    """
    if not values.is_floating_point() or torch.finfo(values.dtype).max <= torch.finfo(dtype).max:
        return
    finite = values.detach()[torch.isfinite(values.detach())]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    if largest > torch.finfo(dtype).max:
        raise PPQConfigError(
            f"{key}: its largest magnitude {largest:.6g} exceeds the largest {dtype} "
            f"({torch.finfo(dtype).max:g}) of {where}: it would be stored as inf. Nothing was "
            "written. Use format='ppq', or a dtype that holds it (dtype='float32' or 'bfloat16')."
        )
