"""The bits one stored weight matrix needs: values, grid overhead, and mask or N:M indices.

The one storage formula of the project: the measured compression rate
(``compressed.accounting``), the joint search's budget and the native export's choice of a
sparse encoding all use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALE_BITS = 16  # scales are stored in fp16


@dataclass(frozen=True)
class Storage:
    """Bits of one stored matrix.

    Attributes:
        payload_bits: the stored values.
        overhead_bits: scales, zero points, and the mask or N:M indices.
    """

    payload_bits: float
    overhead_bits: float

    @property
    def total_bits(self) -> float:
        return self.payload_bits + self.overhead_bits


def index_bits(numel: int, nonzero: int, nm_m: int | None = None) -> int:
    """Bits that say where the kept values of a sparse matrix are: a 1-bit mask per weight, or
    ``ceil(log2 M)`` bits per kept weight for an N:M pattern."""
    return nonzero * math.ceil(math.log2(nm_m)) if nm_m is not None else numel


def sparse_is_smaller(numel: int, nonzero: int, bits: int, nm_m: int | None = None) -> bool:
    """Whether the kept values and their indices take fewer bits than all ``numel`` values."""
    return nonzero * bits + index_bits(numel, nonzero, nm_m) < numel * bits


def weight_storage(
    numel: int,
    bits: int,
    *,
    nonzero: int | None = None,
    groups: int = 0,
    symmetric: bool = True,
    nm_m: int | None = None,
    grid_overhead: float | None = None,
) -> Storage:
    """Storage of a matrix of ``numel`` weights at ``bits`` bits each.

    Args:
        numel: weights of the matrix.
        bits: bits of a stored value (the grid's, or ``B_orig`` when not quantized).
        nonzero: kept weights of a pruned matrix (None: not pruned); stored sparse (values
            plus :func:`index_bits`) when that is smaller than dense.
        groups: quantization groups, each with an fp16 scale (0: not quantized).
        symmetric: no zero point; else a ``bits``-bit zero point per group.
        nm_m: M of an N:M pattern (indices instead of a bitmask).
        grid_overhead: the grid's own count of its overhead bits (``Grid.overhead_bits``:
            any grid kind), used instead of ``groups`` and ``symmetric`` when given.

    Example::

        weight_storage(64 * 128, 4, groups=64, symmetric=False)  # RTN-4 per output channel
    """
    overhead = float(groups * (SCALE_BITS + (0 if symmetric else bits)))
    if grid_overhead is not None:
        overhead = float(grid_overhead)
    if nonzero is not None and sparse_is_smaller(numel, nonzero, bits, nm_m):
        return Storage(nonzero * bits, overhead + index_bits(numel, nonzero, nm_m))
    return Storage(numel * bits, overhead)
