"""GGUF K-quant grids (llama.cpp's Q4_K, Q5_K, Q6_K) as pure math: choose, pack, unpack.

A K-quant row is cut into super-blocks of 256 consecutive weights; each super-block holds
sub-blocks that share one integer sub-scale (and, for Q4_K/Q5_K, one integer sub-min) under
fp16 super-scales. The layouts are llama.cpp's (``ggml/src/ggml-common.h``, ``block_q4_K``,
``block_q5_K``, ``block_q6_K``) and the value of a code is computed exactly as the ``gguf``
package's ``gguf/quants.py`` dequantizer computes it, in float32:

=======  ==========  ===========================================  ============  ==========
kind     sub-block   per super-block (bytes)                      value         bits/weight
=======  ==========  ===========================================  ============  ==========
Q4_K     8 x 32      d, dmin (fp16), 12 bytes of 6-bit sc and m,  ``(d*sc)*q -   4.5
                     128 bytes of 4-bit codes (144 in all)        dmin*m``
Q5_K     8 x 32      as Q4_K plus 32 bytes of high bits (176)     same, 5 bits  5.5
Q6_K     16 x 16     128 bytes low nibbles, 64 bytes of 2 high    ``(d*sc) *    6.5625
                     bits, 16 int8 scales, d (fp16) (210)         (q - 32)``
=======  ==========  ===========================================  ============  ==========

How the scales are chosen (:func:`compute_kquant_grid`). llama.cpp's own quantizer
(``quantize_row_q4_K_ref``) picks each sub-block's scale and min freely, so the value 0 is
generally *not* on its grid: ``d*sc*q == dmin*m`` has no integer solution ``q``. Here every
sub-block of Q4_K/Q5_K gets an integer zero point ``z`` and the file's min is made an exact
multiple of the sub-scale: with ``dmin = d * g`` for an integer ``g`` per super-block and
``m = sc * z / g``, ``dmin*m == (d*sc)*z`` exactly in float32 (``d`` and ``dmin`` carry at most
11 significant bits, ``sc``, ``m`` at most 6 and ``q`` at most 5, so every product is exact), and
code ``z`` decodes to exactly 0 — a pruned weight stays 0 (invariant 2). The search: per
sub-block, a window of sub-scales around its min-max scale and of zero points around its
min-max zero point (plus ``z = 0``), each scored by its exact squared rounding error; per
super-block, every ``g`` in 1..63 for which ``d*g`` is an exact fp16 (``d`` is rounded up to 5
significant bits so that all are), keeping per sub-block the best pair with ``g | sc*z`` and
``sc*z/g <= 63``, and the ``g`` with the least total error. Q6_K has no min: 0 is code 32.
Q6_K sub-scales are kept positive (llama.cpp also writes negative ones).

Because the min is an exact multiple, the grid is an affine integer grid with ``scale = d*sc``
and ``zero = z`` (:meth:`KQuantGrid.as_quant_grid`): ``scale*(q - zero)`` equals the file's
``(d*sc)*q - dmin*m`` bit for bit, so RTN and GPTQ that round to it write exactly the weights
the file stores. A grid read from a file llama.cpp wrote (:func:`unpack_kquant`) may have no
exact zero; :func:`zero_exact` says per sub-block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError, bad_value, check_bool, check_choice, check_int
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.quant_grid import QuantGrid

SUPER_BLOCK = 256  # QK_K: weights per super-block along a row
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins (Q4_K, Q5_K)
SEARCH_ROWS_WEIGHTS = 1 << 16  # weights searched at once by compute_kquant_grid
FP16_TINY = 2.0**-24  # the smallest positive fp16 (subnormal)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class KLayout:
    """The shape of one K-quant kind.

    Attributes:
        bits: bits of a code (4, 5, 6).
        group_size: weights per sub-block (32, or 16 for Q6_K).
        block_bytes: bytes of one super-block of 256 weights.
        has_min: whether sub-blocks carry a min (``dmin * m``).
        scale_max: the largest sub-scale index (63 for 6-bit, 127 for int8).
    """

    bits: int
    group_size: int
    block_bytes: int
    has_min: bool
    scale_max: int


LAYOUTS = {
    "Q4_K": KLayout(4, 32, 2 + 2 + K_SCALE_SIZE + SUPER_BLOCK // 2, True, 63),
    "Q5_K": KLayout(5, 32, 2 + 2 + K_SCALE_SIZE + SUPER_BLOCK // 8 + SUPER_BLOCK // 2, True, 63),
    "Q6_K": KLayout(6, 16, SUPER_BLOCK // 2 + SUPER_BLOCK // 4 + SUPER_BLOCK // 16 + 2, False, 127),
}
KINDS = tuple(LAYOUTS)


def check_kquant_kind(kind: str, argument: str = "kind") -> str:
    """Accept ``"Q4_K"``, ``"Q5_K"`` or ``"Q6_K"``.

    Raises:
        PPQConfigError: naming ``argument``, ``kind`` and the kinds allowed.
    """
    return check_choice(argument, kind, KINDS)


def check_kquant_shape(shape: tuple[int, ...], argument: str = "w.shape") -> None:
    """Accept a matrix shape ``(rows, cols)`` whose ``cols`` is a positive multiple of 256.

    Raises:
        PPQConfigError: for another shape (K-quant super-blocks span 256 weights of a row).
    """
    if len(shape) != 2 or shape[1] <= 0 or shape[1] % SUPER_BLOCK:
        raise bad_value(
            argument,
            tuple(shape),
            f"a matrix (rows, cols) with cols a positive multiple of {SUPER_BLOCK} "
            "(K-quant super-blocks hold 256 weights of a row)",
        )


@dataclass(frozen=True)
class KQuantGrid(Grid):
    """A K-quant grid: what the file stores besides the codes, for a ``(rows, cols)`` weight.

    Attributes:
        kind: ``"Q4_K"``, ``"Q5_K"`` or ``"Q6_K"``.
        d: super-scales, ``(rows, cols // 256)``, float32 holding fp16 values.
        dmin: super-mins, same shape (zeros for Q6_K).
        sc: integer sub-scales, ``(rows, cols // group_size)``, as float32 (0-63; Q6_K -128-127).
        m: integer sub-mins, same shape (0-63; zeros for Q6_K).
    """

    kind: str
    d: Tensor
    dmin: Tensor
    sc: Tensor
    m: Tensor

    @property
    def layout(self) -> KLayout:
        return LAYOUTS[self.kind]

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def symmetric(self) -> bool:
        """Q6_K's grid is centred (code 32 is 0); Q4_K/Q5_K have a zero point per sub-block."""
        return not self.layout.has_min

    def storage_bits(self) -> float:
        """Bits per weight the file stores (codes, sub-scales and super-scales): 4.5, 5.5,
        6.5625."""
        return self.layout.block_bytes * 8 / SUPER_BLOCK

    def _per_sub(self, t: Tensor) -> Tensor:
        """A per-super-block tensor repeated over its sub-blocks."""
        return t.repeat_interleave(SUPER_BLOCK // self.group_size, dim=1)

    @property
    def scale(self) -> Tensor:
        """Step of each sub-block, ``d * sc`` in float32 as gguf computes it."""
        return self._per_sub(self.d) * self.sc

    @property
    def offset(self) -> Tensor:
        """What each sub-block subtracts from ``scale * q``: ``dmin * m`` (Q6_K: ``32 * scale``)."""
        if not self.layout.has_min:
            return self.scale * 32.0
        return self._per_sub(self.dmin) * self.m

    @property
    def zero(self) -> Tensor:
        """The code of the value 0 per sub-block, ``offset / scale`` (an integer on the grids
        :func:`compute_kquant_grid` builds; 0 where the scale is 0)."""
        if not self.layout.has_min:
            return torch.full_like(self.sc, 32.0)
        scale = self.scale
        return torch.where(scale != 0, self.offset / torch.where(scale != 0, scale, 1.0), 0.0)

    def _expand(self, t: Tensor, cols: int) -> Tensor:
        if cols != t.shape[1] * self.group_size:
            raise bad_value(
                "w.shape[1]", cols, f"{t.shape[1] * self.group_size}, the columns of this grid"
            )
        return t.repeat_interleave(self.group_size, dim=1)

    def _round(self, w: Tensor, scale: Tensor, zero: Tensor, offset: Tensor) -> Tensor:
        safe = torch.where(scale != 0, scale, 1.0)
        integral = zero == torch.round(zero)
        q = torch.where(integral, torch.round(w / safe) + zero, torch.round((w + offset) / safe))
        return torch.clamp(torch.where(scale != 0, q, 0.0), 0, self.maxq)

    def quantize(self, w: Tensor) -> Tensor:
        """Integer codes of ``w`` (rows, cols) on this grid, as float32 in [0, 2**bits - 1]:
        the nearest level (``round(w / scale) + zero``, as QuantGrid rounds)."""
        cols = w.shape[1]
        return self._round(
            w.float(),
            self._expand(self.scale, cols),
            self._expand(self.zero, cols),
            self._expand(self.offset, cols),
        )

    def dequantize(self, q: Tensor) -> Tensor:
        """Real values of codes ``q`` (rows, cols), float32, computed as gguf's dequantizer
        does: ``(d*sc)*q - dmin*m`` (Q4_K, Q5_K) or ``(d*sc)*(q - 32)`` (Q6_K)."""
        cols = q.shape[1]
        scale = self._expand(self.scale, cols)
        if not self.layout.has_min:
            return scale * (q.float() - 32.0)
        return scale * q.float() - self._expand(self.offset, cols)

    def fake_quantize(self, w: Tensor) -> Tensor:
        """Round ``w`` to the nearest grid point (float32, same shape)."""
        return self.dequantize(self.quantize(w))

    def round_column(self, values: Tensor, column: int) -> Tensor:
        """Round one column's values ``(rows,)`` (input column ``column``) onto its levels, as
        GPTQ's column walk needs (float32)."""
        g = column // self.group_size
        scale, zero, offset = self.scale[:, g], self.zero[:, g], self.offset[:, g]
        q = self._round(values.float(), scale, zero, offset)
        if not self.layout.has_min:
            return scale * (q - 32.0)
        return scale * q - offset

    def off_grid_distance(self, w: Tensor) -> Tensor:
        """Per-element distance of ``w`` to its nearest grid point, in units of the step
        (0 where a sub-block's step is 0 and ``w`` is its one value, else inf there)."""
        diff = (w.float() - self.fake_quantize(w)).abs()
        step = self._expand(self.scale, w.shape[1]).abs()
        return torch.where(step != 0, diff / torch.where(step != 0, step, 1.0), diff * torch.inf)

    def as_quant_grid(self) -> QuantGrid:
        """The same levels as an affine :class:`~ppq_lightning.ops.quant_grid.QuantGrid`
        (``scale = d*sc``, ``zero = z``), whose ``scale * (q - zero)`` equals this grid's
        :meth:`dequantize` bit for bit: GPTQ's column walk can round to it unchanged.

        Raises:
            PPQConfigError: when a sub-block has no exact zero or a non-positive scale (a grid
                read from a file llama.cpp quantized).
        """
        scale = self.scale
        if not bool(zero_exact(self).all() and (scale > 0).all()):
            raise PPQConfigError(
                f"this {self.kind} grid has sub-blocks whose 0 is not a level or whose scale is "
                "not positive; only such grids are affine integer grids (compute_kquant_grid "
                "builds them)."
            )
        return QuantGrid(scale, self.zero, self.bits, self.group_size, self.symmetric)

    def neighbour(self, q: Tensor, step: int) -> Tensor:
        """The code of the next level up (``step=1``) or down (``step=-1``), clamped to the
        range."""
        return torch.clamp(q + step, 0, self.maxq)

    def to(self, device: torch.device | str) -> KQuantGrid:
        return KQuantGrid(
            self.kind,
            self.d.to(device),
            self.dmin.to(device),
            self.sc.to(device),
            self.m.to(device),
        )

    def select_rows(self, rows: slice | Tensor) -> KQuantGrid:
        """The grid of the weight rows ``rows``."""
        return KQuantGrid(self.kind, self.d[rows], self.dmin[rows], self.sc[rows], self.m[rows])

    @classmethod
    def concat(cls, grids: list[KQuantGrid]) -> KQuantGrid:
        """One grid holding the rows of ``grids`` (one kind) in order."""
        kinds = {g.kind for g in grids}
        if len(kinds) != 1:
            raise bad_value("grids", sorted(kinds), "grids of one K-quant kind")
        return KQuantGrid(
            grids[0].kind,
            *(torch.cat([getattr(g, f) for g in grids]) for f in ("d", "dmin", "sc", "m")),
        )

    def overhead_bits(self) -> float:
        """Everything a super-block stores besides its codes: fp16 ``d`` (and ``dmin``) and
        the sub-block scales (and mins), over the matrix."""
        rows, n_super = self.d.shape
        per_block = self.layout.block_bytes * 8 - SUPER_BLOCK * self.bits
        return float(rows * n_super * per_block)


def zero_exact(grid: KQuantGrid) -> Tensor:
    """Per sub-block ``(rows, cols // group_size)``: whether the value 0 is exactly a level
    (some code decodes to exactly 0.0 in float32). Always true on the grids
    :func:`compute_kquant_grid` builds and for Q6_K; often false on a Q4_K/Q5_K file llama.cpp
    quantized (its mins are not multiples of its scales)."""
    zero = grid.zero
    code = torch.clamp(torch.round(zero), 0, grid.maxq)
    if not grid.layout.has_min:
        return torch.ones_like(zero, dtype=torch.bool)
    return grid.scale * code - grid.offset == 0


def _fp16_ceil(x: Tensor, significant: int) -> Tensor:
    """The smallest fp16 value >= ``x`` (> 0) with at most ``significant`` significant bits
    (a multiple of 2**-24 below the normal range); 2**-24 for ``x == 0``; inf past fp16."""
    _, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    unit = torch.clamp(torch.ldexp(torch.ones_like(x), exponent - significant), min=FP16_TINY)
    y = torch.clamp(torch.ceil(x / unit) * unit, min=FP16_TINY)
    return torch.where(y > FP16_MAX, torch.inf, y.half().float())


def _rounding_error(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Squared error of rounding ``x`` (..., n) on the grid ``scale * (q - zero)`` for every
    candidate: ``scale``/``zero`` broadcast against ``x[..., None, n]``-style shapes."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero) - x).pow(2).sum(dim=-1)


def _divisible_table(maxq: int, device: torch.device) -> Tensor:
    """``table[P, g - 1]`` for every product ``P = sc * z`` (0..63 * maxq) and ``g`` in 1..63:
    whether ``m = P / g`` is an integer in 0..63."""
    product = torch.arange(63 * maxq + 1, device=device)[:, None]
    g = torch.arange(1, 64, device=device)
    return (product % g == 0) & (product <= 63 * g)


def _search_with_min(x: Tensor, maxq: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Q4_K/Q5_K scales of ``x`` (rows, n_super, 8, 32): d, dmin (rows, n_super), sc, m
    (rows, n_super, 8), with every sub-block's min an exact multiple of its scale."""
    lo = x.amin(dim=-1).clamp(max=0)
    hi = x.amax(dim=-1).clamp(min=0)
    wanted = (hi - lo) / maxq  # min-max scale per sub-block
    d = _fp16_ceil(wanted.amax(dim=-1) / 63, significant=5)  # every d*g (g <= 63) is an fp16
    if not torch.isfinite(d).all():
        raise bad_value("w", "a matrix with |values| too large", "a range whose fp16 d is finite")
    dd = d[..., None, None]  # (rows, n_super, 1, 1)
    base = torch.floor(wanted / d[..., None]).clamp(1, 63)
    sc = (base[..., None] + torch.arange(-3.0, 5.0, device=x.device)).clamp(1, 63)  # (r,n,8,8)
    step = dd * sc
    z0 = torch.round(-lo[..., None] / step)
    window = torch.arange(-3.0, 5.0, device=x.device)  # the last is replaced by z = 0
    z = (z0[..., None] + window).clamp(0, maxq)  # (r, n, 8, 8, 8)
    z[..., -1] = 0.0  # z = 0 (m = 0) is valid under every g: a finite fallback
    err = _rounding_error(x[..., None, None, :], step[..., None, None], z[..., None], maxq)
    product = sc[..., None] * z  # sc * z, (r, n, 8, 8, 8)
    g = torch.arange(1.0, 64.0, device=x.device)
    table = _divisible_table(maxq, x.device)  # table[P, g - 1]: g divides P and P / g <= 63
    valid = table[product.long()]  # (r, n, 8, 8, 8, 63)
    per_g = torch.where(valid, err[..., None], torch.inf).flatten(3, 4).amin(dim=3)  # (r,n,8,63)
    dmin_all = d[..., None] * g
    exact = (dmin_all.half().float() == dmin_all) & (dmin_all <= FP16_MAX)
    total = torch.where(exact, per_g.sum(dim=2), torch.inf)  # (r, n, 63)
    g_best = torch.argmin(total, dim=-1)  # smallest g among equals
    g_value = g[g_best]  # (r, n)
    ok = torch.gather(
        valid, -1, g_best[..., None, None, None, None].expand(*valid.shape[:-1], 1)
    ).squeeze(-1)
    choice = torch.where(ok, err, torch.inf).flatten(3, 4).argmin(dim=-1)  # (r, n, 8)
    sc_best = torch.gather(sc, -1, (choice // z.shape[-1])[..., None]).squeeze(-1)
    z_best = torch.gather(z.flatten(3, 4), -1, choice[..., None]).squeeze(-1)
    m = sc_best * z_best / g_value[..., None]
    return d, d * g_value, sc_best, m


def _search_q6(x: Tensor) -> tuple[Tensor, Tensor]:
    """Q6_K scales of ``x`` (rows, n_super, 16, 16): d (rows, n_super), sc (rows, n_super, 16),
    positive, levels ``d*sc*(q - 32)`` for q in 0..63."""
    wanted = torch.maximum((-x).amax(dim=-1).clamp(min=0) / 32, x.amax(dim=-1).clamp(min=0) / 31)
    d = _fp16_ceil(wanted.amax(dim=-1) / 127, significant=11)
    if not torch.isfinite(d).all():
        raise bad_value("w", "a matrix with |values| too large", "a range whose fp16 d is finite")
    base = torch.floor(wanted / d[..., None]).clamp(1, 127)
    sc = (base[..., None] + torch.arange(-3.0, 5.0, device=x.device)).clamp(1, 127)
    step = d[..., None, None] * sc
    err = _rounding_error(x[..., None, :], step[..., None], torch.tensor(32.0, device=x.device), 63)
    best = torch.gather(sc, -1, err.argmin(dim=-1, keepdim=True)).squeeze(-1)
    return d, best


def compute_kquant_grid(w: Tensor, kind: str) -> KQuantGrid:
    """Choose the K-quant scales of ``w`` (rows, cols): fp16 ``d``/``dmin`` per super-block of
    256, integer sub-scales and sub-mins at their stored widths, with 0 exactly a level of
    every sub-block (see the module's docstring for the search).

    Args:
        w: weight matrix ``(rows, cols)``, any float dtype, finite; ``cols`` a multiple of 256.
        kind: ``"Q4_K"``, ``"Q5_K"`` or ``"Q6_K"``.

    Returns:
        The grid; ``grid.quantize(w)`` gives the codes, ``grid.fake_quantize(w)`` the values
        the file decodes (bit for bit).

    Raises:
        PPQConfigError: on another kind, a shape whose columns are not a multiple of 256, a
            non-finite weight, or values whose fp16 super-scale would overflow.
    """
    layout = LAYOUTS[check_kquant_kind(kind)]
    check_kquant_shape(tuple(w.shape))
    if not torch.isfinite(w).all():
        raise bad_value("w", "a matrix with inf or NaN values", "finite values")
    rows, cols = w.shape
    n_super, per = cols // SUPER_BLOCK, SUPER_BLOCK // layout.group_size
    step = max(1, SEARCH_ROWS_WEIGHTS // cols)
    ds, dmins, scs, ms = [], [], [], []
    for start in range(0, rows, step):
        x = w[start : start + step].detach().float()
        x = x.reshape(x.shape[0], n_super, per, layout.group_size)
        if layout.has_min:
            d, dmin, sc, m = _search_with_min(x, 2**layout.bits - 1)
        else:
            d, sc = _search_q6(x)
            dmin, m = torch.zeros_like(d), torch.zeros_like(sc)
        ds.append(d)
        dmins.append(dmin)
        scs.append(sc.reshape(x.shape[0], -1))
        ms.append(m.reshape(x.shape[0], -1))
    device = w.device

    def cat(parts: list[Tensor], width: int) -> Tensor:
        return (torch.cat(parts) if parts else torch.empty(0, width)).to(device)

    return KQuantGrid(
        kind,
        cat(ds, n_super),
        cat(dmins, n_super),
        cat(scs, n_super * per),
        cat(ms, n_super * per),
    )


def _check_codes(grid: KQuantGrid, codes: Tensor) -> Tensor:
    rows, n_sub = grid.sc.shape
    if tuple(codes.shape) != (rows, n_sub * grid.group_size):
        raise bad_value("codes.shape", tuple(codes.shape), f"{(rows, n_sub * grid.group_size)}")
    q = codes.detach().cpu().float()
    if not bool(((q == q.round()) & (q >= 0) & (q <= grid.maxq)).all()):
        raise bad_value("codes", "values outside the integers 0..maxq", f"integers 0..{grid.maxq}")
    return q.to(torch.uint8)


def _check_stored(grid: KQuantGrid) -> None:
    """Refuse a grid the file cannot hold (sub-scales outside their width, inexact fp16)."""
    low = -128 if not grid.layout.has_min else 0
    for name, t, lo, hi in (
        ("grid.sc", grid.sc, low, grid.layout.scale_max),
        ("grid.m", grid.m, 0, 63),
    ):
        if not bool(((t == t.round()) & (t >= lo) & (t <= hi)).all()):
            raise bad_value(name, "values outside the stored width", f"integers {lo}..{hi}")
    for name, t in (("grid.d", grid.d), ("grid.dmin", grid.dmin)):
        if not bool((t.half().float() == t).all()):
            raise bad_value(name, "values that are not fp16 numbers", "finite fp16 values")


def pack_kquant(grid: KQuantGrid, codes: Tensor) -> np.ndarray:
    """The GGUF blocks of ``codes`` on ``grid``: uint8, one row of blocks per weight row,
    ``(rows, cols // 256 * block_bytes)``, as ``gguf.GGUFWriter.add_tensor(..., raw_dtype=)``
    takes them and ``gguf.quants.dequantize`` reads them.

    Args:
        grid: the grid (its ``d``, ``dmin``, ``sc``, ``m``).
        codes: integer codes ``(rows, cols)`` in 0..2**bits - 1 (``grid.quantize(w)``).

    Raises:
        PPQConfigError: on codes of another shape or outside the code range, or a grid whose
            values the file cannot hold.
    """
    _check_stored(grid)
    q = _check_codes(grid, codes)
    rows = q.shape[0]
    n_super = grid.d.shape[1]
    q = q.reshape(rows, n_super, SUPER_BLOCK)
    d = grid.d.cpu().half().reshape(rows, n_super, 1).view(torch.uint8)
    if grid.kind == "Q6_K":
        halves = q.reshape(rows, n_super, 2, 4, 32)  # 128 weights per half, 4 runs of 32
        low, high = halves & 0xF, halves >> 4
        ql = (low[..., 0:2, :] | (low[..., 2:4, :] << 4)).flatten(2)
        qh = high[..., 0, :] | high[..., 1, :] << 2 | high[..., 2, :] << 4 | high[..., 3, :] << 6
        scales = grid.sc.cpu().to(torch.int8).reshape(rows, n_super, 16).view(torch.uint8)
        parts = [ql, qh.flatten(2), scales, d]
    else:
        sc = grid.sc.cpu().to(torch.uint8).reshape(rows, n_super, 8)
        m = grid.m.cpu().to(torch.uint8).reshape(rows, n_super, 8)
        packed = torch.cat(
            [
                sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
                m[..., :4] | ((m[..., 4:] >> 4) << 6),
                (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4),
            ],
            dim=-1,
        )
        dmin = grid.dmin.cpu().half().reshape(rows, n_super, 1).view(torch.uint8)
        runs = q.reshape(rows, n_super, 4, 2, 32)  # 4 pairs of sub-blocks of 32
        qs = ((runs[..., 0, :] & 0xF) | ((runs[..., 1, :] & 0xF) << 4)).flatten(2)
        parts = [d, dmin, packed]
        if grid.kind == "Q5_K":
            bits = (q.reshape(rows, n_super, 8, 32) >> 4) & 1
            shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
            qh = (bits << shifts).sum(dim=2, dtype=torch.uint8)  # bit k: sub-block k
            parts.append(qh)
        parts.append(qs)
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()


def unpack_kquant(data: np.ndarray, kind: str) -> tuple[KQuantGrid, Tensor]:
    """Read GGUF K-quant blocks back: the grid and the codes (float32), such that
    ``grid.dequantize(codes)`` equals ``gguf.quants.dequantize(data, kind)``.

    Args:
        data: uint8 blocks ``(rows, n_blocks * block_bytes)`` (one row of blocks per weight row).
        kind: ``"Q4_K"``, ``"Q5_K"`` or ``"Q6_K"``.

    Raises:
        PPQConfigError: on another kind, or data that is not a 2-D uint8 array of whole blocks.
    """
    layout = LAYOUTS[check_kquant_kind(kind)]
    array = np.asarray(data)
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] % layout.block_bytes:
        raise bad_value(
            "data",
            f"an array of dtype {array.dtype} and shape {array.shape}",
            f"a 2-D uint8 array whose rows are whole {kind} blocks of {layout.block_bytes} bytes",
        )
    rows = array.shape[0]
    b = torch.from_numpy(np.ascontiguousarray(array)).reshape(rows, -1, layout.block_bytes)
    n_super = b.shape[1]

    def half(t: Tensor) -> Tensor:
        return t.contiguous().view(torch.float16).float().reshape(rows, n_super)

    if kind == "Q6_K":
        ql, qh = b[..., :128].reshape(rows, n_super, 2, 2, 32), b[..., 128:192]
        scales, d = b[..., 192:208], b[..., 208:210]
        low = torch.cat([ql & 0xF, ql >> 4], dim=-2)  # (r, n, 2 halves, 4 runs, 32)
        qh = (
            qh.reshape(rows, n_super, 2, 1, 32)
            >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
        )
        q = low | ((qh & 3) << 4)
        sc = scales.contiguous().view(torch.int8).float().reshape(rows, -1)
        grid = KQuantGrid(kind, half(d), torch.zeros(rows, n_super), sc, torch.zeros_like(sc))
        return grid, q.reshape(rows, -1).float()
    d, dmin, packed = b[..., 0:2], b[..., 2:4], b[..., 4:16].long()
    first, second, third = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([first & 63, (third & 0xF) | ((first >> 6) << 4)], dim=-1)
    m = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=-1)
    qs = b[..., -128:].reshape(rows, n_super, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-2).reshape(rows, n_super, 8, 32)
    if kind == "Q5_K":
        qh = b[..., 16:48].reshape(rows, n_super, 1, 32)
        shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
        q = q | (((qh >> shifts) & 1) << 4)
    grid = KQuantGrid(
        kind, half(d), half(dmin), sc.float().reshape(rows, -1), m.float().reshape(rows, -1)
    )
    return grid, q.reshape(rows, -1).float()


# --- llama.cpp's Q4_K_M mixture -------------------------------------------------------------

_NOT_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "position_embd",
    "pos_embd",
    "token_types",
)
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or _c_mod(i_layer - n_layers // 8, 3) == 2
    )


def _c_mod(a: int, b: int) -> int:
    """C's ``%``, which truncates toward zero (``-1 % 3`` is -1 in C, 2 in Python)."""
    return a - b * int(a / b)


def _fallback(kind: str, cols: int | None) -> str:
    """llama.cpp's ``tensor_type_fallback`` for a row length a K-quant block does not divide."""
    if cols is None or cols % SUPER_BLOCK == 0:
        return kind
    other = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}[kind]
    return other if cols % 32 == 0 else "F16"


def q4_k_m_types(
    tensor_names: Sequence[str],
    n_layers: int,
    columns: Mapping[str, int] | None = None,
    large_70b: bool = False,
) -> dict[str, str | None]:
    """The GGUF type llama.cpp's ``Q4_K_M`` mixture gives each tensor of a dense model.

    The rule of ``llama_tensor_get_type_impl`` for ``LLAMA_FTYPE_MOSTLY_Q4_K_M`` in llama.cpp's
    ``src/llama-quant.cpp`` (as vendored by llama-cpp-python 0.3.36), for a non-Falcon model
    without experts and no user overrides:

    - ``output.weight`` -> Q6_K; ``token_embd.weight`` -> Q6_K when there is no
      ``output.weight`` (tied embeddings: quantized as the output), else the default Q4_K;
    - attention-V-like tensors (names containing ``attn_v.weight``, ``attn_qkv.weight`` or
      ``attn_kv_b.weight``), counted in list order as ``i_attention_wv`` out of all of them, and
      ``ffn_down`` tensors, counted in list order as ``i_ffn_down`` out of ``n_layers`` -> Q6_K
      where ``use_more_bits(i, n)``: ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (C integer
      arithmetic), else Q4_K (Q5_K for attention V when ``large_70b``: llama.cpp's
      ``LLM_TYPE_70B`` bump);
    - every other quantized tensor -> Q4_K; tensors llama.cpp does not quantize by name (norms,
      biases, anything not ending in ``weight``, expert gates, position embeddings) -> None.
    - with ``columns``, the shape fallback ``tensor_type_fallback``: a row length not a multiple
      of 256 turns Q4_K into Q5_0 and Q6_K into Q8_0 (F16 when 32 does not divide it either);
      the output tensor becomes Q8_0 directly.

    1-D tensors are not quantized by llama.cpp either; their names (norms, biases) are covered
    by the rules above for llama-style models.

    Args:
        tensor_names: GGUF tensor names in the order the file holds them (the counters run in
            this order, as llama.cpp's do).
        n_layers: the model's block count (``n_layer``).
        columns: optional row length (``ne[0]``, input features) per tensor name.
        large_70b: apply llama.cpp's 70B attention-V bump (its ``LLM_TYPE_70B`` models).

    Returns:
        ``{name: "Q4_K" | "Q6_K" | "Q5_K" | "Q5_0" | "Q8_0" | "F16" | None}`` in list order.

    Raises:
        PPQConfigError: on a string instead of a list of names, a non-positive ``n_layers``,
            more ``ffn_down`` tensors than ``n_layers`` (mixture-of-experts models, whose rule
            reads the block index from the name, are not supported), or duplicate names.
    """
    if isinstance(tensor_names, str) or not all(isinstance(n, str) for n in tensor_names):
        raise bad_value("tensor_names", tensor_names, "a list of GGUF tensor names (strings)")
    names = list(tensor_names)
    if len(set(names)) != len(names):
        raise bad_value("tensor_names", "a list with duplicate names", "each name once")
    n_layers = check_int("n_layers", n_layers, minimum=1)
    large_70b = check_bool("large_70b", large_70b)
    n_down = sum("ffn_down" in n for n in names)
    if n_down > n_layers:
        raise bad_value(
            "tensor_names",
            f"a list with {n_down} ffn_down tensors",
            f"at most n_layers={n_layers} (one per block; mixture-of-experts models are not "
            "supported)",
        )

    def attn_v_like(name: str) -> bool:
        return any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))

    n_attention_wv = sum(attn_v_like(n) for n in names)
    tied = "output.weight" not in names
    i_attention_wv = i_ffn_down = 0
    types: dict[str, str | None] = {}
    for name in names:
        cols = None if columns is None else columns.get(name)
        if not name.endswith("weight") or any(s in name for s in _NOT_QUANTIZED):
            types[name] = None
            continue
        kind = "Q4_K"
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            kind = "Q8_0" if cols is not None and cols % SUPER_BLOCK else "Q6_K"
            types[name] = kind
            continue
        if name == "token_embd.weight":
            kind = "Q4_K"
        elif attn_v_like(name):
            if _use_more_bits(i_attention_wv, n_attention_wv):
                kind = "Q6_K"
            elif large_70b:
                kind = "Q5_K"
            i_attention_wv += 1
        elif "ffn_down" in name:
            if _use_more_bits(i_ffn_down, n_layers):
                kind = "Q6_K"
            i_ffn_down += 1
        types[name] = _fallback(kind, cols)
    return types


__all__ = [
    "KINDS",
    "LAYOUTS",
    "SUPER_BLOCK",
    "KLayout",
    "KQuantGrid",
    "check_kquant_kind",
    "check_kquant_shape",
    "compute_kquant_grid",
    "pack_kquant",
    "q4_k_m_types",
    "unpack_kquant",
    "zero_exact",
]
