"""Grid formats: the name of every grid kind a quantizer rounds to, and one dispatch over them.

======================  ===================================================  ======  =========
format                  grid                                                 bits    group
======================  ===================================================  ======  =========
``int``                 affine integer grid (:mod:`~.quant_grid`)            2-8     any
``nvfp4``, ``mxfp4``    E2M1 values, E4M3 / E8M0 scales (:mod:`~.float_grid`)  4     16 / 32
``fp8``, ``fp8_block``  E4M3 values, float32 scales per row / 128 x 128 block    8     row / 128
``Q4_K``, ``Q5_K``,     GGUF K-quant super-blocks (:mod:`~.kquants`)         4/5/6   32/32/16
``Q6_K``
``Q4_K_M``              llama.cpp's mixture: Q6_K on some attention-V and    4 / 6   32 / 16
                        FFN-down layers, Q4_K elsewhere (resolved per layer
                        by ``modules.mixed_precision``)
``Q4_0``, ``Q4_1``,     GGUF's legacy blocks: names for integer grids in     4/4/5   32
``Q5_0``, ``Q5_1``,     groups of 32, symmetric (``_0``) or with a zero      5/8
``Q8_0``                point (``_1``); they resolve to ``int``
======================  ===================================================  ======  =========

A :class:`GridSpec` is one layer's choice (format, bits, group size, symmetry), validated and
resolved once: for every format but ``int`` the format fixes the bits, the group and the
symmetry, and a contradicting argument is refused. :meth:`GridSpec.round_` rounds a weight in
place and returns its grid, whatever the kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from ppq_lightning.errors import bad_value, check_bool
from ppq_lightning.ops.float_grid import (
    FLOAT_FORMATS,
    SPECS,
    check_float_shape,
    compute_float_grid,
    float_storage,
    round_to_float_grid_,
)
from ppq_lightning.ops.grid import ROUND_ROWS, Grid, round_rows_
from ppq_lightning.ops.kquants import (
    KINDS,
    LAYOUTS,
    SUPER_BLOCK,
    check_kquant_shape,
    compute_kquant_grid,
)
from ppq_lightning.ops.quant_grid import (
    OFF_BITS,
    check_bits,
    check_group_size,
    compute_grid,
    round_to_grid_,
)
from ppq_lightning.ops.storage import Storage, weight_storage

INT = "int"
Q4_K_M = "Q4_K_M"
GRID_FORMATS = (INT, *FLOAT_FORMATS, *KINDS)
"""Every grid kind a layer can hold."""
MIXTURES = (Q4_K_M,)
"""Formats that choose a grid kind per layer."""
LEGACY_BLOCKS = {
    "Q4_0": (4, True),
    "Q4_1": (4, False),
    "Q5_0": (5, True),
    "Q5_1": (5, False),
    "Q8_0": (8, True),
}
"""GGUF's legacy block types as ``(bits, symmetric)`` integer grids in groups of 32."""
LEGACY_GROUP = 32
_SPELLING = {f.lower(): f for f in (*GRID_FORMATS, *MIXTURES, *LEGACY_BLOCKS)}


def check_grid_format(format: str, argument: str = "format", mixtures: bool = True) -> str:
    """The canonical spelling of a grid format (``"NVFP4"`` -> ``"nvfp4"``,
    ``"q4_k"`` -> ``"Q4_K"``).

    Raises:
        PPQConfigError: naming ``argument``, the value and every format allowed.
    """
    allowed = GRID_FORMATS + tuple(LEGACY_BLOCKS) + (MIXTURES if mixtures else ())
    spelled = _SPELLING.get(format.lower()) if isinstance(format, str) else None
    if spelled is None or spelled not in allowed:
        integer = re.fullmatch(r"u?int(\d+)", format.lower()) if isinstance(format, str) else None
        hint = f" (an integer grid: format='int' with bits={integer[1]})" if integer else ""
        raise bad_value(argument, format, f"one of {', '.join(allowed)}{hint}")
    return spelled


def format_settings(format: str) -> tuple[int, int | None, bool]:
    """The ``(bits, group_size, symmetric)`` a format other than ``int`` fixes (for Q4_K_M,
    those of Q4_K, its default kind)."""
    format = "Q4_K" if format == Q4_K_M else format
    if format in SPECS:
        spec = SPECS[format]
        return spec.bits, spec.group_size, True
    layout = LAYOUTS[format]
    return layout.bits, layout.group_size, not layout.has_min


def _check_fixed(
    format: str,
    fixed: dict[str, object],
    bits: int | None,
    group_size: int | None,
    symmetric: bool | None,
    prefix: str,
) -> None:
    """Refuse a given argument that differs from what ``format`` fixes (None: left out)."""
    given = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    for name, value in given.items():
        if value is not None and value != fixed[name]:
            raise bad_value(
                f"{prefix}{name}",
                value,
                f"{fixed[name]!r} (what format={format!r} stores; leave it out)",
            )


@dataclass(frozen=True)
class GridSpec:
    """One layer's grid choice, resolved (:meth:`of`).

    Attributes:
        format: one of :data:`GRID_FORMATS` (or :data:`MIXTURES` for a stage's choice, before
            it is resolved per layer).
        bits: bits of a stored value (16: not quantized).
        group_size: input columns sharing a scale; None for one per output row.
        symmetric: no zero point.
    """

    format: str
    bits: int
    group_size: int | None
    symmetric: bool

    @classmethod
    def of(
        cls,
        format: str = INT,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool | None = None,
        allow_off: bool = False,
        prefix: str = "",
    ) -> GridSpec:
        """Validate and resolve a grid's arguments.

        For ``int``, ``bits`` is required (2-8, or 16 with ``allow_off``) and ``symmetric``
        defaults to False. Every other format fixes all three (:func:`format_settings`);
        left out, they take its values, and given, they must equal them.

        Args:
            format, bits, group_size, symmetric: the arguments as the user gave them.
            allow_off: accept ``bits=16`` (no quantization) on the integer grid.
            prefix: prepended to argument names in errors (``"layer_bits['mlp']."``).

        Raises:
            PPQConfigError: an unknown format, bits missing or outside 2-8 for ``int``, or a
                bits, group size or symmetry the format contradicts (asymmetric FP grids,
                NVFP4 with groups of 32, ...).
        """
        format = check_grid_format(format, f"{prefix}format")
        if format in LEGACY_BLOCKS:  # an integer grid by another name
            legacy_bits, legacy_symmetric = LEGACY_BLOCKS[format]
            fixed = {"bits": legacy_bits, "group_size": LEGACY_GROUP, "symmetric": legacy_symmetric}
            _check_fixed(format, fixed, bits, group_size, symmetric, prefix)
            return cls(INT, legacy_bits, LEGACY_GROUP, legacy_symmetric)
        if format == INT:
            if bits is None:
                raise bad_value(
                    f"{prefix}bits",
                    bits,
                    "an integer from 2 to 8 for format='int', or a format that fixes the bits "
                    f"({', '.join(f for f in GRID_FORMATS if f != INT)})",
                )
            bits = check_bits(bits, f"{prefix}bits", allow_off=allow_off)
            if group_size is not None:
                check_group_size(group_size, group_size, f"{prefix}group_size")
            symmetric = False if symmetric is None else check_bool(f"{prefix}symmetric", symmetric)
            return cls(INT, bits, group_size, symmetric)
        fixed_bits, fixed_group, fixed_symmetric = format_settings(format)
        fixed = {"bits": fixed_bits, "group_size": fixed_group, "symmetric": fixed_symmetric}
        _check_fixed(format, fixed, bits, group_size, symmetric, prefix)
        return cls(format, fixed_bits, fixed_group, fixed_symmetric)

    @property
    def off(self) -> bool:
        """Whether this choice leaves the layer unquantized (``bits=16``)."""
        return self.bits == OFF_BITS

    def check_shape(self, shape: tuple[int, int], argument: str = "weight") -> None:
        """Refuse a ``(rows, cols)`` weight this grid cannot hold: a group size that does not
        divide ``cols``; columns not a multiple of 16/32 (NVFP4/MXFP4) or 256 (K-quants); for
        fp8_block rows or columns not multiples of 128.

        Raises:
            PPQConfigError: naming ``argument``, the shape and what the format needs.
        """
        if self.format == INT:
            check_group_size(self.group_size, shape[1], f"group_size ({argument})")
        elif self.format in SPECS:
            check_float_shape(tuple(shape), self.format, f"{argument} shape")
        elif self.format in LAYOUTS:
            check_kquant_shape(tuple(shape), f"{argument} shape")
        else:
            raise bad_value("format", self.format, "a format resolved per layer")

    def compute(self, w: Tensor) -> Grid:
        """The grid of this choice for ``w`` (rows, cols), from its current values."""
        if self.format == INT:
            return compute_grid(w, self.bits, self.group_size, self.symmetric)
        if self.format in SPECS:
            return compute_float_grid(w, self.format)
        return compute_kquant_grid(w, self.format)

    def round_(self, w: Tensor, rows: int = ROUND_ROWS) -> tuple[Grid, float]:
        """Round ``w`` (rows, cols) in place onto its grid, ``rows`` rows at a time.

        Returns:
            The grid and the relative error ``||W - W_hat||^2 / ||W||^2``.
        """
        if self.format == INT:
            return round_to_grid_(w, self.bits, self.group_size, self.symmetric, rows)
        if self.format in SPECS:
            return round_to_float_grid_(w, self.format, rows)
        grid = compute_kquant_grid(w, self.format)
        return grid, round_rows_(w, rows, lambda part, x: grid.select_rows(part).fake_quantize(x))

    def storage(self, rows: int, cols: int) -> Storage:
        """The bits a dense ``(rows, cols)`` matrix takes on this grid: values, and scales (zero
        points, global scales) at their stored width, as ``Grid.overhead_bits`` counts them.

        Raises:
            PPQConfigError: for a shape the format cannot hold.
        """
        self.check_shape((rows, cols))
        if self.format == INT:
            groups = rows * (cols // (self.group_size or cols))
            return weight_storage(rows * cols, self.bits, groups=groups, symmetric=self.symmetric)
        if self.format in SPECS:
            return float_storage(self.format, rows, cols)
        layout = LAYOUTS[self.format]
        blocks = rows * cols // SUPER_BLOCK
        values = rows * cols * layout.bits
        return Storage(float(values), float(blocks * layout.block_bytes * 8 - values))

    def describe(self) -> str:
        """A short name: ``int4 g128``, ``nvfp4``, ``Q6_K``."""
        if self.format != INT:
            return self.format
        group = f" g{self.group_size}" if self.group_size is not None else ""
        return f"int{self.bits}{group}{' sym' if self.symmetric else ''}"
