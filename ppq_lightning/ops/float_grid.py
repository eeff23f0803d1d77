"""Floating-point micro-scaled quantization grids: NVFP4, MXFP4, FP8 per channel and per block.

A :class:`FloatGrid` rounds a weight matrix ``W`` of shape ``(rows, cols)`` to
``level * element_scale``, where ``level`` is a value of the element format (E2M1 or E4M3,
:mod:`ppq_lightning.ops.float_formats`) and ``element_scale`` is shared by a group of weights:

============  =======  ==============================  ==============================  ========
format        element  scale (stored as)               shared by                       global
============  =======  ==============================  ==============================  ========
``nvfp4``     E2M1     E4M3 value                      16 consecutive input columns    float32
``mxfp4``     E2M1     E8M0 power of two               32 consecutive input columns    none
``fp8``       E4M3     float32                         one output row (per channel)    none
``fp8_block`` E4M3     float32                         a 128 x 128 block of ``W``      none
============  =======  ==============================  ==============================  ========

The grids are those of compressed-tensors (the format transformers and vLLM load), whose
definitions (version 0.20) they follow, so that an exporter writes exactly the recorded codes:

- ``nvfp4`` (compressed-tensors' ``NVFP4`` scheme, ``TENSOR_GROUP`` strategy, group 16, E4M3
  scales): the global scale is ``448 * 6 / amax(|W|)`` in float32, 1.0 where that is not
  finite (an all-zero weight) (``quantization.utils.helpers.generate_gparam``); a group's scale
  is ``round_to_e4m3(amax_group / 6 * global_scale)``, 0.125 (the E4M3 ``eps`` its
  ``_get_dtype_eps`` gives) where that rounds to 0 (``calculate_qparams``); a weight's code
  is the E2M1 value nearest to ``w / (scale / global_scale)``, clamped to ±6
  (``forward_helpers._quantize``, ``fp4_utils.cast_to_fp4``), and its value is
  ``e2m1 * (scale / global_scale)`` (``forward_helpers._dequantize``).
- ``mxfp4`` (its ``MXFP4`` scheme, group 32, uint8 E8M0 scales): the scale is
  ``2**(floor(log2(amax_group)) - 2)`` as the OCP MX spec v1.0 defines it
  (:func:`~ppq_lightning.ops.float_formats.mx_shared_exponent`), stored as the biased
  exponent that compressed-tensors' ``mx_utils.decompress_mx_scale`` decodes as
  ``2**(e - 127)``. compressed-tensors' own observer (``mxfp_utils.generate_mx_scales``) rounds
  ``amax_group`` up to the next power of two when its significand is at least 1.75 before
  taking the floor, so for such groups it picks a scale twice as large; both decode the same
  way, and this grid follows the specification.
- ``fp8`` (its ``FP8_DYNAMIC`` weights: ``CHANNEL`` strategy, ``float-quantized``): one scale
  per output row, ``amax_row / 448``, float32 ``eps`` where the row is all zero; a weight's
  code is the E4M3 value nearest to ``w / scale`` clamped to ±448.
- ``fp8_block`` (its ``FP8_BLOCK`` scheme, ``block_structure [128, 128]``): the same with one
  scale per 128 x 128 block.

A code is the element's bit pattern, as float32 (like :class:`~ppq_lightning.ops.quant_grid.
QuantGrid`'s codes): 0-15 for E2M1 (``sign << 3 | magnitude``), 0-255 for E4M3 (the byte of a
``torch.float8_e4m3fn``). Zero is code 0 on every grid and every scale is positive, so a pruned
weight stays exactly zero. Every grid is symmetric (no zero point).

A weight held in a 16-bit dtype is *on the grid* when it is a grid value computed in float32
and rounded once to that dtype, as for :class:`~ppq_lightning.ops.quant_grid.QuantGrid`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value, check_choice, check_int
from ppq_lightning.ops.float_formats import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MAX_MAGNITUDE_CODE,
    e2m1_code,
    e2m1_value,
    e4m3_code,
    e4m3_value,
    e8m0_value,
    mx_shared_exponent,
    round_to_e4m3,
)
from ppq_lightning.ops.grid import ROUND_ROWS, Grid, round_rows_
from ppq_lightning.ops.storage import Storage

FLOAT_FORMATS = ("nvfp4", "mxfp4", "fp8", "fp8_block")
NVFP4_EMPTY_SCALE = 0.125  # compressed-tensors' E4M3 eps: the scale of an all-zero group
FP8_EMPTY_SCALE = float(torch.finfo(torch.float32).eps)  # its float32 eps, likewise


@dataclass(frozen=True)
class _Spec:
    element: str  # "e2m1" or "e4m3"
    bits: int  # bits of a stored value
    group_size: int | None  # input columns sharing a scale (None: the whole row)
    block_rows: int  # rows sharing a scale (128 for fp8_block, else 1)
    scale_bits: int  # bits of a stored scale
    global_bits: int  # bits of the per-tensor global scale (0: none)


SPECS = {
    "nvfp4": _Spec("e2m1", 4, 16, 1, 8, 32),
    "mxfp4": _Spec("e2m1", 4, 32, 1, 8, 0),
    "fp8": _Spec("e4m3", 8, None, 1, 32, 0),
    "fp8_block": _Spec("e4m3", 8, 128, 128, 32, 0),
}


def check_float_format(format: str, argument: str = "format") -> str:
    """Validate the name of a floating-point grid format.

    Raises:
        PPQConfigError: when ``format`` is not one of :data:`FLOAT_FORMATS`.
    """
    return check_choice(argument, format, FLOAT_FORMATS)


def check_float_shape(shape: tuple[int, ...], format: str, argument: str = "w.shape") -> None:
    """Refuse a weight shape the format cannot hold: not 2-D, empty, a column count that is not
    a multiple of the group (16 for nvfp4, 32 for mxfp4), or for fp8_block rows or columns that
    are not multiples of 128.

    Raises:
        PPQConfigError: naming the shape, the format and which dimension does not fit.
    """
    spec = SPECS[check_float_format(format)]
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or 0 in shape:
        raise bad_value(argument, shape, "a non-empty 2-D weight matrix (rows, cols)")
    rows, cols = shape
    if spec.block_rows > 1 and rows % spec.block_rows:
        raise bad_value(
            argument,
            shape,
            f"rows divisible by {spec.block_rows} for {format} ({spec.block_rows} x "
            f"{spec.group_size} blocks); {rows} rows are not",
        )
    if spec.group_size is not None and cols % spec.group_size:
        raise bad_value(
            argument,
            shape,
            f"columns (the input dimension) divisible by {spec.group_size} for {format}; "
            f"{cols} columns are not",
        )


def float_storage(format: str, rows: int, cols: int) -> Storage:
    """The bits a ``(rows, cols)`` matrix stored in ``format`` takes: the values
    (``bits`` each) and the scales at their real width, plus nvfp4's 32-bit global scale.

    Per weight: nvfp4 ``4 + 8/16 + 32/(rows*cols)``, mxfp4 ``4 + 8/32``, fp8
    ``8 + 32/cols``, fp8_block ``8 + 32/(128*128)``.

    Raises:
        PPQConfigError: on an unknown format or a shape it cannot hold.
    """
    check_float_shape((rows, cols), format, "(rows, cols)")
    spec = SPECS[format]
    n_scales = (rows // spec.block_rows) * (cols // (spec.group_size or cols))
    return Storage(
        float(rows * cols * spec.bits), float(n_scales * spec.scale_bits + spec.global_bits)
    )


def _signed_index(code: Tensor, magnitude_bits: int) -> Tensor:
    """A sign-magnitude code as a signed integer, monotone in the value it codes (int64)."""
    code = code.long()
    sign = 1 << magnitude_bits
    magnitude = code & (sign - 1)
    return torch.where((code & sign) != 0, -magnitude, magnitude)


def _code_of_index(index: Tensor, magnitude_bits: int) -> Tensor:
    """The inverse of :func:`_signed_index` (zero: code 0), as float32."""
    return torch.where(index < 0, (1 << magnitude_bits) - index, index).float()


@dataclass(frozen=True)
class FloatGrid(Grid):
    """A floating-point micro-scaled grid of one ``(rows, cols)`` weight matrix.

    Attributes:
        scale: the stored scales as float32 values, positive: ``(rows, cols // 16)`` E4M3
            values for nvfp4, ``(rows, cols // 32)`` powers of two for mxfp4, ``(rows, 1)``
            for fp8, ``(rows // 128, cols // 128)`` for fp8_block.
        global_scale: nvfp4's per-tensor float32 scale, shape ``(1,)``; None otherwise. A
            weight's scale is ``scale / global_scale``.
        format: one of :data:`FLOAT_FORMATS`.
        shape: the ``(rows, cols)`` of the matrix.
    """

    scale: Tensor
    global_scale: Tensor | None
    format: str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        check_float_shape(self.shape, self.format, "shape")
        if (self.global_scale is not None) != (self.format == "nvfp4"):
            raise bad_value(
                "global_scale", self.global_scale, "a (1,) float32 tensor for nvfp4, else None"
            )

    @property
    def _spec(self) -> _Spec:
        return SPECS[self.format]

    @property
    def bits(self) -> int:
        """Bits of a stored value: 4 (E2M1) or 8 (E4M3)."""
        return self._spec.bits

    @property
    def group_size(self) -> int | None:
        """Input columns sharing a scale: 16, 32, None (the whole row) or 128."""
        return self._spec.group_size

    @property
    def symmetric(self) -> bool:
        """Always True: floating-point grids have no zero point."""
        return True

    @property
    def element(self) -> str:
        """The element format: ``"e2m1"`` or ``"e4m3"``."""
        return self._spec.element

    @property
    def max_level(self) -> float:
        """The largest element value: 6 (E2M1) or 448 (E4M3)."""
        return E2M1_MAX if self.element == "e2m1" else E4M3_MAX

    @property
    def _magnitude_bits(self) -> int:
        return self.bits - 1

    @property
    def _max_index(self) -> int:
        return 7 if self.element == "e2m1" else E4M3_MAX_MAGNITUDE_CODE

    def storage_bits(self) -> float:
        """Bits per weight this grid stores (:func:`float_storage` over the matrix)."""
        rows, cols = self.shape
        return float_storage(self.format, rows, cols).total_bits / (rows * cols)

    # -- the scale of each weight --------------------------------------------------------

    def _slices(self, rows: int = ROUND_ROWS) -> Iterator[slice]:
        for start in range(0, self.shape[0], rows):
            yield slice(start, min(start + rows, self.shape[0]))

    def _scale_rows(self, rows: slice) -> Tensor:
        """The stored scales of matrix rows ``rows`` as a ``(len, n_column_groups)`` float32
        tensor of weight scales (divided by the global scale for nvfp4)."""
        block = self._spec.block_rows
        if block > 1:
            first = rows.start // block
            scale = self.scale[first : -(-rows.stop // block)].repeat_interleave(block, dim=0)
            scale = scale[rows.start - first * block : rows.stop - first * block]
        else:
            scale = self.scale[rows]
        return scale / self.global_scale if self.global_scale is not None else scale

    def _element_scale(self, rows: slice) -> Tensor:
        """The scale of every weight of matrix rows ``rows``: ``(len, cols)`` float32."""
        scale = self._scale_rows(rows)
        return scale.repeat_interleave(self.shape[1] // scale.shape[1], dim=1)

    def column_scales(self) -> Tensor:
        """The scale of every row and column group, ``(rows, cols // group)`` float32 (one
        column for fp8): what :meth:`round_scaled` rounds a column with."""
        return self._scale_rows(slice(0, self.shape[0]))

    def round_scaled(self, values: Tensor, scale: Tensor) -> Tensor:
        """The grid values nearest to ``values`` given their scales ``scale`` (same shape),
        float32: a column walk's rounding with the scales it took once from
        :meth:`column_scales`."""
        return self._element_values(self._element_codes(values.float() / scale)) * scale

    def column_scale(self, column: int) -> Tensor:
        """The scale of every weight of input column ``column``: ``(rows,)`` float32 (what a
        column walk such as GPTQ's rounds one column with: :meth:`round_column`)."""
        group = column // (self.group_size or self.shape[1])
        return self._scale_rows(slice(0, self.shape[0]))[:, group]

    # -- element codes -----------------------------------------------------------------

    def _element_codes(self, x: Tensor) -> Tensor:
        """Codes of the element values nearest to ``x`` (in units of the scale), float32."""
        code = e2m1_code(x) if self.element == "e2m1" else e4m3_code(x)
        return code.float()

    def _element_values(self, code: Tensor) -> Tensor:
        return e2m1_value(code) if self.element == "e2m1" else e4m3_value(code)

    def _check(self, w: Tensor, argument: str = "w") -> None:
        if tuple(w.shape) != self.shape:
            raise bad_value(f"{argument}.shape", tuple(w.shape), f"the grid's shape {self.shape}")

    # -- QuantGrid's interface -----------------------------------------------------------

    def quantize(self, w: Tensor) -> Tensor:
        """Codes of the grid values nearest to ``w`` (rows, cols), float32: 0-15 (E2M1) or
        0-255 (E4M3); 0 for a zero weight. Decided ``ROUND_ROWS`` rows at a time.

        Raises:
            PPQConfigError: when ``w``'s shape is not the grid's.
        """
        self._check(w)
        out = torch.empty(self.shape, dtype=torch.float32, device=w.device)
        for rows in self._slices():
            out[rows] = self._element_codes(w[rows].float() / self._element_scale(rows))
        return out

    def dequantize(self, q: Tensor) -> Tensor:
        """Real values of codes ``q`` (rows, cols): ``element value * scale``, float32.

        Raises:
            PPQConfigError: when ``q``'s shape is not the grid's.
        """
        self._check(q, "q")
        out = torch.empty(self.shape, dtype=torch.float32, device=q.device)
        for rows in self._slices():
            out[rows] = self._element_values(q[rows]) * self._element_scale(rows)
        return out

    def fake_quantize(self, w: Tensor) -> Tensor:
        """Round ``w`` (rows, cols) to the nearest grid value (float32, same shape)."""
        self._check(w)
        out = torch.empty(self.shape, dtype=torch.float32, device=w.device)
        for rows in self._slices():
            scale = self._element_scale(rows)
            code = self._element_codes(w[rows].float() / scale)
            out[rows] = self._element_values(code) * scale
        return out

    def round_column(self, values: Tensor, column: int) -> Tensor:
        """The grid values nearest to ``values`` (rows,), the weights of input column
        ``column``, float32: one column of :meth:`fake_quantize`, for a column walk."""
        return self.round_scaled(values, self.column_scale(column))

    def off_grid_distance(self, w: Tensor) -> Tensor:
        """Per-element distance of ``w`` to its nearest grid value, in units of the local
        spacing of the levels: the gap between that value and its neighbour on ``w``'s side
        (the neighbour inwards beyond the largest level). At most 0.5 inside the range."""
        self._check(w)
        out = torch.empty(self.shape, dtype=torch.float32, device=w.device)
        bits, top = self._magnitude_bits, self._max_index
        for rows in self._slices():
            x, scale = w[rows].float(), self._element_scale(rows)
            code = self._element_codes(x / scale)
            value = self._element_values(code) * scale
            index = _signed_index(code, bits)
            step = torch.where(x >= value, 1, -1)
            step = torch.where((index + step).abs() > top, -step, step)
            neighbour = self._element_values(_code_of_index(index + step, bits)) * scale
            out[rows] = (x - value).abs() / (neighbour - value).abs()
        return out

    def neighbour(self, q: Tensor, step: int) -> Tensor:
        """The code of the next level up (``step=1``) or down (``step=-1``) in value, clamped
        to the largest magnitude (codes are sign and magnitude: the next level of ``-0.5`` up
        is ``0``)."""
        index = _signed_index(q, self._magnitude_bits)
        top = self._max_index
        return _code_of_index((index + step).clamp(-top, top), self._magnitude_bits)

    def to(self, device: torch.device | str) -> FloatGrid:
        global_scale = None if self.global_scale is None else self.global_scale.to(device)
        return FloatGrid(self.scale.to(device), global_scale, self.format, self.shape)

    def select_rows(self, rows: slice | Tensor) -> FloatGrid:
        """The grid of the weight rows ``rows`` (same global scale; for fp8_block a slice of
        whole 128-row blocks).

        Raises:
            PPQConfigError: for fp8_block rows that are not whole blocks.
        """
        block = self._spec.block_rows
        if isinstance(rows, Tensor):
            if block > 1:
                raise bad_value("rows", "an index tensor", f"a slice of whole {block}-row blocks")
            scale = self.scale[rows]
        else:
            start, stop, step = rows.indices(self.shape[0])
            if block > 1 and (step != 1 or start % block or stop % block):
                raise bad_value("rows", rows, f"a slice of whole {block}-row blocks for fp8_block")
            scale = self.scale[start // block : stop // block] if block > 1 else self.scale[rows]
        kept = scale.shape[0] * block
        return FloatGrid(scale, self.global_scale, self.format, (kept, self.shape[1]))

    @classmethod
    def concat(cls, grids: list[FloatGrid]) -> FloatGrid:
        """One grid holding the rows of ``grids`` in order: one format, one global scale.

        Raises:
            PPQConfigError: on grids of different formats or global scales (nvfp4's global
                scale belongs to the whole tensor: compute it once, then solve row groups on
                :meth:`select_rows`).
        """
        first = grids[0]
        for grid in grids[1:]:
            same_global = (grid.global_scale is None and first.global_scale is None) or (
                grid.global_scale is not None
                and first.global_scale is not None
                and torch.equal(grid.global_scale, first.global_scale)
            )
            if grid.format != first.format or not same_global:
                raise bad_value(
                    "grids", "grids of different formats or global scales", "one tensor's grid"
                )
        rows = sum(g.shape[0] for g in grids)
        scale = torch.cat([g.scale for g in grids])
        return FloatGrid(scale, first.global_scale, first.format, (rows, first.shape[1]))

    def overhead_bits(self) -> float:
        """The scales at their stored width, plus nvfp4's 32-bit global scale."""
        rows, cols = self.shape
        return float_storage(self.format, rows, cols).overhead_bits


def _row_amax(w: Tensor, rows: int) -> Tensor:
    """``amax(|w|)`` over the whole matrix, float32 ``(1,)``, ``rows`` rows at a time."""
    amax = torch.zeros(1, dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows):
        low, high = torch.aminmax(w[start : start + rows])
        amax = torch.maximum(amax, torch.maximum(low.abs(), high.abs()).float())
    return amax


def _scales(part: Tensor, format: str, global_scale: Tensor | None) -> Tensor:
    """The stored scales of the rows ``part`` (a slice of whole 128-row blocks for
    fp8_block), float32."""
    rows, cols = part.shape
    spec = SPECS[format]
    a = part.float().abs()
    if format == "fp8":
        amax = a.amax(dim=1, keepdim=True)
    elif format == "fp8_block":
        amax = a.reshape(rows // 128, 128, cols // 128, 128).amax(dim=(1, 3))
    else:
        amax = a.reshape(rows, cols // spec.group_size, spec.group_size).amax(dim=2)
    if format == "nvfp4":
        scale = round_to_e4m3(global_scale * (amax / E2M1_MAX))
        return torch.where(scale == 0, torch.full_like(scale, NVFP4_EMPTY_SCALE), scale)
    if format == "mxfp4":
        return e8m0_value(mx_shared_exponent(amax))
    scale = amax / E4M3_MAX
    return torch.where(scale == 0, torch.full_like(scale, FP8_EMPTY_SCALE), scale)


def compute_float_grid(w: Tensor, format: str, rows: int = ROUND_ROWS) -> FloatGrid:
    """The grid of ``format`` for ``w`` (rows, cols), as compressed-tensors' observers build
    it from the weight's maxima (the module docstring gives each definition's source).

    Args:
        w: weight matrix, shape ``(rows, cols)``, any float dtype.
        format: ``"nvfp4"``, ``"mxfp4"``, ``"fp8"`` (one scale per output row) or
            ``"fp8_block"`` (one per 128 x 128 block).
        rows: rows read at a time (float32 temporaries cover one slice; rounded up to a
            multiple of 128 for fp8_block).

    Raises:
        PPQConfigError: on an unknown format, a weight that is not a non-empty 2-D float
            matrix, a column count not divisible by the group (16, 32), for fp8_block rows or
            columns not divisible by 128, or ``rows`` below 1; before any computation.
    """
    check_float_format(format)
    check_float_shape(tuple(w.shape), format)
    if not w.is_floating_point():
        raise bad_value("w.dtype", w.dtype, "a floating-point weight")
    rows = check_int("rows", rows, minimum=1)
    block = SPECS[format].block_rows
    rows = -(-rows // block) * block
    global_scale = None
    if format == "nvfp4":
        amax = _row_amax(w.detach(), rows).clamp(min=torch.finfo(torch.float32).tiny)
        global_scale = torch.nan_to_num(E4M3_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0)
    scales = [
        _scales(w.detach()[start : start + rows], format, global_scale)
        for start in range(0, w.shape[0], rows)
    ]
    return FloatGrid(torch.cat(scales), global_scale, format, tuple(w.shape))


def round_to_float_grid_(w: Tensor, format: str, rows: int = ROUND_ROWS) -> tuple[FloatGrid, float]:
    """Round ``w`` (rows, cols) in place to its grid of ``format`` (:func:`compute_float_grid`),
    ``rows`` rows at a time, like :func:`~ppq_lightning.ops.quant_grid.round_to_grid_`.

    Args:
        w: weight matrix, shape ``(rows, cols)``, any float dtype (a view of a layer's weight).
        format: one of :data:`FLOAT_FORMATS`.
        rows: rows per slice.

    Returns:
        The grid, and the relative error ``||W - W_hat||^2 / ||W||^2`` (``W_hat`` in float32,
        before the rounding to ``w``'s dtype).

    Raises:
        PPQConfigError: as :func:`compute_float_grid`, before ``w`` changes.
    """
    grid = compute_float_grid(w, format, rows)
    block = SPECS[format].block_rows
    slice_rows = -(-rows // block) * block  # whole 128-row blocks for fp8_block

    def rounded(part: slice, original: Tensor) -> Tensor:
        part = slice(part.start, min(part.stop, grid.shape[0]))
        return grid.round_scaled(original, grid._element_scale(part))

    return grid, round_rows_(w, slice_rows, rounded)
