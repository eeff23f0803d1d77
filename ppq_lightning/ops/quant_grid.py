"""Uniform integer quantization grids (round-to-nearest), per channel or per group.

A grid maps a weight matrix ``W`` of shape ``(rows, cols)`` onto integers
``q = clamp(round(W / scale) + zero, 0, 2**bits - 1)`` and back with ``scale * (q - zero)``.
``scale`` and ``zero`` hold one value per row and group of ``group_size`` consecutive columns
(one group per row when ``group_size`` is None: per-channel). ``zero`` is an integer, so the
value 0 is always exactly representable: a pruned weight quantizes to exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value, check_int, plain_number

MIN_BITS, MAX_BITS = 2, 8
OFF_BITS = 16  # "no quantization": the bit width of an original LLM weight


def check_bits(bits: int, argument: str = "bits", allow_off: bool = False) -> int:
    """Validate a bit width: an integer in [2, 8] (or 16, meaning off, when ``allow_off``).

    Raises:
        PPQConfigError: when ``bits`` is not allowed.
    """
    bits = plain_number(bits)  # np.int64(4), torch.tensor(4)
    valid = not isinstance(bits, bool) and isinstance(bits, int)
    if valid and (MIN_BITS <= bits <= MAX_BITS or (allow_off and bits == OFF_BITS)):
        return bits
    off = f", or {OFF_BITS} (off)" if allow_off else ""
    raise bad_value(argument, bits, f"an integer from {MIN_BITS} to {MAX_BITS}{off}")


def check_group_size(group_size: int | None, cols: int, argument: str = "group_size") -> int:
    """Return the effective group size for a matrix with ``cols`` input columns.

    Raises:
        PPQConfigError: when ``group_size`` is not a positive divisor of ``cols``.
    """
    if group_size is None:
        return cols
    check_int(argument, group_size, minimum=1, allowed="None (per channel) or a positive integer")
    if cols % group_size:
        raise bad_value(argument, group_size, f"a divisor of the input dimension {cols}")
    return group_size


@dataclass(frozen=True)
class QuantGrid:
    """An affine integer grid with one ``(scale, zero)`` per row and column group.

    Attributes:
        scale: step sizes, shape ``(rows, n_groups)``, float32, positive.
        zero: integer zero points (stored as float32), shape ``(rows, n_groups)``.
        bits: bit width of the integer codes.
        group_size: columns per group; None means one group per row (per channel).
        symmetric: whether the grid is centred on zero (``zero = 2**(bits-1)``).
    """

    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def centred(self) -> bool:
        """Symmetric with every zero point at ``2**(bits-1)``: codes ``q - 2**(bits-1)`` are
        the signed integers of runtime formats (compressed-tensors, GGUF Q4_0/Q8_0)."""
        return bool(self.symmetric and torch.all(self.zero == 2 ** (self.bits - 1)))

    def _expand(self, t: Tensor, cols: int) -> Tensor:
        """Repeat per-group values over the columns of each group: (rows, cols)."""
        return t.repeat_interleave(cols // t.shape[1], dim=1)

    def quantize(self, w: Tensor) -> Tensor:
        """Integer codes of ``w`` (rows, cols) on this grid, as float32 in [0, 2**bits - 1]."""
        cols = w.shape[1]
        scale, zero = self._expand(self.scale, cols), self._expand(self.zero, cols)
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, self.maxq)

    def dequantize(self, q: Tensor) -> Tensor:
        """Real values of integer codes ``q`` (rows, cols), float32."""
        cols = q.shape[1]
        return self._expand(self.scale, cols) * (q - self._expand(self.zero, cols))

    def fake_quantize(self, w: Tensor) -> Tensor:
        """Round ``w`` to the nearest grid point (float32, same shape)."""
        return self.dequantize(self.quantize(w))

    def off_grid_distance(self, w: Tensor) -> Tensor:
        """Per-element distance of ``w`` to its nearest grid point, in units of the step."""
        return (w.float() - self.fake_quantize(w)).abs() / self._expand(self.scale, w.shape[1])

    def to(self, device: torch.device | str) -> QuantGrid:
        return QuantGrid(
            self.scale.to(device), self.zero.to(device), self.bits, self.group_size, self.symmetric
        )


def compute_grid(
    w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = False
) -> QuantGrid:
    """Min-max grid for ``w`` (rows, cols), as GPTQ's ``Quantizer.find_params`` builds it.

    The range of every group is widened to include 0 so that zero stays representable.

    Args:
        w: weight matrix, shape ``(rows, cols)``.
        bits: bit width, 2 to 8.
        group_size: columns per group, a divisor of ``cols``; None for per-channel.
        symmetric: centre the grid on zero.

    Raises:
        PPQConfigError: on bits outside 2-8 or a group size that does not divide ``cols``.
    """
    check_bits(bits)
    rows, cols = w.shape
    gs = check_group_size(group_size, cols)
    g = w.detach().float().reshape(rows, cols // gs, gs)  # (rows, n_groups, gs)
    xmin = g.amin(dim=2).clamp(max=0)
    xmax = g.amax(dim=2).clamp(min=0)
    maxq = 2**bits - 1
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmax - xmin) == 0  # an all-zero group: any positive step represents it
    scale = torch.where(empty, torch.ones_like(xmax), (xmax - xmin) / maxq)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale) + 0.0  # +0.0, never -0.0 (bit-exact exports)
    return QuantGrid(scale, zero, bits, group_size, symmetric)
