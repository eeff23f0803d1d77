"""Uniform integer quantization grids (round-to-nearest), per channel or per group.

A grid maps a weight matrix ``W`` of shape ``(rows, cols)`` onto integers
``q = clamp(round(W / scale) + zero, 0, 2**bits - 1)`` and back with ``scale * (q - zero)``.
``scale`` and ``zero`` hold one value per row and group of ``group_size`` consecutive columns
(one group per row when ``group_size`` is None: per-channel). ``zero`` is an integer, so the
value 0 is always exactly representable: a pruned weight quantizes to exactly 0.

A weight held in a 16-bit dtype (bf16, fp16) is *on the grid* when it is a grid value computed
in float32 and rounded once to that dtype: ``w == (scale * (k - zero)).to(w.dtype)`` for some code
``k`` (:meth:`QuantGrid.on_grid`). Its code is read back as the code whose rounded value it is
(:meth:`QuantGrid.codes`). Two neighbouring levels can round to the same 16-bit value when the
dtype's spacing there exceeds the step: in bf16 (8 significant bits) once ``|k - zero| > 128``,
which an asymmetric 8-bit grid reaches (up to 255); in fp16 where a step falls below the
subnormal spacing ``2**-24``. Such levels are one weight value, and the code read back is the
one nearest to it (:func:`indistinct_levels` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value, check_int, plain_number
from ppq_lightning.ops.grid import ROUND_ROWS, Grid, round_rows_
from ppq_lightning.ops.storage import SCALE_BITS

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
class QuantGrid(Grid):
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

    def neighbour(self, q: Tensor, step: int) -> Tensor:
        """The code of the next level up (``step=1``) or down (``step=-1``), clamped to the
        range."""
        return torch.clamp(q + step, 0, self.maxq)

    def to(self, device: torch.device | str) -> QuantGrid:
        return QuantGrid(
            self.scale.to(device), self.zero.to(device), self.bits, self.group_size, self.symmetric
        )

    def select_rows(self, rows: slice | Tensor) -> QuantGrid:
        """The grid of the weight rows ``rows``."""
        return QuantGrid(
            self.scale[rows], self.zero[rows], self.bits, self.group_size, self.symmetric
        )

    @classmethod
    def concat(cls, grids: list[QuantGrid]) -> QuantGrid:
        """One grid holding the rows of ``grids`` in order (same bits, group size, symmetry)."""
        first = grids[0]
        return QuantGrid(
            torch.cat([g.scale for g in grids]),
            torch.cat([g.zero for g in grids]),
            first.bits,
            first.group_size,
            first.symmetric,
        )

    def overhead_bits(self) -> float:
        """An fp16 scale per row and group, plus a ``bits``-bit zero point when asymmetric."""
        return float(self.scale.numel() * (SCALE_BITS + (0 if self.symmetric else self.bits)))


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


def indistinct_levels(grid: QuantGrid, dtype: torch.dtype, rows: int = 4096) -> int:
    """How many pairs of neighbouring levels ``(k, k + 1)`` of ``grid``, over all its rows and
    groups, round to the same value in ``dtype``: levels a weight of that dtype cannot tell
    apart (its code is then read back as the one nearest to the shared value). 0 for float32
    and float64. Counted ``rows`` rows at a time; a grid whose levels the dtype provably keeps
    apart (bf16 below 8 bits: ``|k - zero| <= 127``; fp16 with normal, finite levels) is not
    enumerated.

    Args:
        grid: the grid.
        dtype: the dtype of the weight that holds it.
        rows: rows enumerated at once (memory: ``rows * groups * 2**bits`` values).
    """
    if torch.finfo(dtype).bits > 16:
        return 0
    info = torch.finfo(dtype)
    significant = {torch.bfloat16: 8, torch.float16: 11}.get(dtype, 8)
    span = float(torch.maximum(grid.zero, grid.maxq - grid.zero).max())
    largest = float((grid.scale * span).max())
    if (
        span < 2 ** (significant - 1)
        and float(grid.scale.min()) >= info.tiny
        and largest < info.max
    ):
        return 0  # every level k != zero: relative rounding below half a step
    levels = torch.arange(grid.maxq + 1, dtype=torch.float32, device=grid.scale.device)
    count = 0
    for start in range(0, grid.scale.shape[0], rows):
        scale = grid.scale[start : start + rows, :, None]
        zero = grid.zero[start : start + rows, :, None]
        held = (scale * (levels - zero)).to(dtype)
        count += int((held[..., 1:] == held[..., :-1]).sum())
    return count


def round_to_grid_(
    w: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    rows: int = ROUND_ROWS,
) -> tuple[QuantGrid, float]:
    """Round ``w`` (rows, cols) in place to its min-max grid (:func:`compute_grid`), ``rows``
    rows at a time, so that the float32 temporaries cover one slice, not the matrix (a 70B
    MLP weight has 235M entries: 0.9 GB per float32 copy). The result equals rounding the
    whole matrix at once: every row's grid depends on that row alone.

    Args:
        w: weight matrix, shape ``(rows, cols)``, any float dtype (a view of a layer's weight).
        bits: bit width, 2 to 8.
        group_size: columns per group, a divisor of ``cols``; None for per-channel.
        symmetric: centre the grid on zero.
        rows: rows per slice.

    Returns:
        The grid of the whole matrix, and the relative error ``||W - W_hat||^2 / ||W||^2``
        (``W_hat`` in float32, before the rounding to ``w``'s dtype).

    Raises:
        PPQConfigError: on bits outside 2-8 or a group size that does not divide ``cols``.
    """
    grids = []

    def rounded(part: slice, original: Tensor) -> Tensor:
        grids.append(compute_grid(original, bits, group_size, symmetric))  # each row's own
        return grids[-1].fake_quantize(original)

    error = round_rows_(w, rows, rounded)
    scale = torch.cat([g.scale for g in grids]) if grids else torch.empty(0, 1)
    zero = torch.cat([g.zero for g in grids]) if grids else torch.empty(0, 1)
    return QuantGrid(scale, zero, bits, group_size, symmetric), error
