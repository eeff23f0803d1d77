"""What every kind of quantization grid shares: how a weight held in its dtype reads back.

A grid (:class:`~ppq_lightning.ops.quant_grid.QuantGrid`, an affine integer grid;
:class:`~ppq_lightning.ops.float_grid.FloatGrid`, NVFP4/MXFP4/FP8;
:class:`~ppq_lightning.ops.kquants.KQuantGrid`, GGUF K-quant blocks) maps a weight matrix
``(rows, cols)`` to integer codes (``quantize``, as float32) and codes back to real values
(``dequantize``, float32). A weight held in a 16-bit dtype (bf16, fp16) is *on the grid* when it
is a grid value computed in float32 and rounded once to that dtype; :class:`Grid` reads such a
weight's codes back and tests it, for every kind, from the kind's own ``quantize``,
``dequantize`` and ``neighbour``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value

ROUND_ROWS = 1024
"""Rows a grid rounds (and Wanda decides) at a time: float32 temporaries cover a slice of rows,
not the matrix (a 70B MLP weight has 235M entries: 0.9 GB per float32 copy); a multiple of
the 128-row FP8 block."""


class Grid:
    """The methods every grid kind shares (a mixin of the grid dataclasses).

    A kind defines ``quantize(w) -> codes`` (the nearest level, float32), ``dequantize(codes)``
    (float32) and ``neighbour(codes, step)``: the code of the next level up (``step=1``) or
    down (``step=-1``) in value, staying at the end of the range.
    """

    def quantize(self, w: Tensor) -> Tensor:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    def dequantize(self, q: Tensor) -> Tensor:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    def neighbour(self, q: Tensor, step: int) -> Tensor:  # pragma: no cover - likewise
        raise NotImplementedError

    def select_rows(self, rows: slice) -> Grid:  # pragma: no cover - every kind defines it
        """The grid of the weight rows ``rows`` (a solver's row group, a sliced layer)."""
        raise NotImplementedError

    @classmethod
    def concat(cls, grids: list[Grid]) -> Grid:  # pragma: no cover - every kind defines it
        """One grid holding the rows of ``grids`` (of this kind, alike) in order."""
        raise NotImplementedError

    def overhead_bits(self) -> float:  # pragma: no cover - every kind defines it
        """Bits the grid stores besides the values: scales (and zero points, global scales,
        sub-block scales and mins) at their real width, over the whole matrix."""
        raise NotImplementedError

    def held(self, q: Tensor, dtype: torch.dtype) -> Tensor:
        """The grid values of codes ``q`` (rows, cols) as a weight of ``dtype`` holds them:
        computed in float32 and rounded once to ``dtype``."""
        return self.dequantize(q).to(dtype)

    def codes(self, w: Tensor) -> Tensor:
        """The codes of a weight ``w`` (rows, cols) on this grid, as float32.

        For a float32 or float64 ``w``, :meth:`quantize`. For a 16-bit ``w`` (bf16, fp16), the
        code whose value rounded to ``w``'s dtype is ``w``: the nearest code, else its neighbour
        in value on either side (a tie of the dtype's rounding can put ``w`` nearer to the next
        level's value than to its own, and a dtype cannot tell some levels apart, as fp16 below
        its subnormal range); the nearest code where no level rounds to ``w`` (a weight off the
        grid)."""
        q = self.quantize(w)
        if torch.finfo(w.dtype).bits > 16:
            return q
        for step in (-1, 1):
            other = self.neighbour(q, step)
            q = torch.where(
                (self.held(q, w.dtype) != w) & (self.held(other, w.dtype) == w), other, q
            )
        return q

    def on_grid(self, w: Tensor) -> Tensor:
        """Per element of a 16-bit ``w`` (rows, cols): whether it is a grid value computed in
        float32 and rounded once to ``w``'s dtype (bool, same shape).

        Raises:
            PPQConfigError: for a ``w`` of 32 bits or more (those are compared with a
                tolerance: ``off_grid_distance``).
        """
        if torch.finfo(w.dtype).bits > 16:
            raise bad_value("w.dtype", w.dtype, "a 16-bit float dtype (bfloat16 or float16)")
        return self.held(self.codes(w), w.dtype) == w


def round_rows_(w: Tensor, rows: int, rounded: Callable[[slice, Tensor], Tensor]) -> float:
    """Replace ``w`` (rows, cols) in place, ``rows`` rows at a time, by ``rounded(part,
    original)`` (``original``: those rows in float32), so that float32 temporaries cover one
    slice, not the matrix; return the relative error ``||W - W_hat||^2 / ||W||^2`` (``W_hat``
    in float32, before the rounding to ``w``'s dtype)."""
    error, norm = 0.0, 0.0
    for start in range(0, w.shape[0], rows):
        part = slice(start, start + rows)
        original = w[part].float()
        new = rounded(part, original)
        error += float((new - original).pow(2).sum())
        norm += float(original.pow(2).sum())
        w[part].copy_(new)
    return error / max(norm, 1e-12)
