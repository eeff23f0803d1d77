"""The element and scale formats of floating-point micro-scaled grids: E2M1, E4M3, E8M0.

Every rounding here is to the nearest representable value, ties to the even code (the one
whose last mantissa bit is 0), and saturating: a finite input beyond the largest value becomes
the largest value of its sign; nothing produces an infinity or a NaN from a finite input. Zero
always gets the code 0 (never the negative zero's code), so a pruned weight is stored as the
all-zero bit pattern.

- **E2M1** (FP4; the OCP Microscaling Formats (MX) specification v1.0, and NVIDIA's NVFP4): a sign
  bit and 3 bits of magnitude. Codes 0-7 are ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and codes 8-15 the
  same magnitudes negated (code 8 is -0). compressed-tensors orders its ``kE2M1ToFloat`` table
  and packs nibbles ``sign << 3 | magnitude`` the same way.
- **E4M3** (FP8, the ``fn`` variant of OCP's OFP8 and of ``torch.float8_e4m3fn``): 4 exponent
  bits with bias 7, 3 mantissa bits, no infinities, NaN only at ``S.1111.111``; largest value
  448, smallest normal ``2**-6``, subnormals ``k * 2**-9`` for ``k = 1..7``. Rounding clamps to
  ``[-448, 448]`` and then casts to ``torch.float8_e4m3fn``, a round-to-nearest-even cast
  (compressed-tensors' ``round_to_quantized_type_dtype`` does the same).
- **E8M0** (the MX shared scale): an 8-bit biased exponent ``e``, the value ``2**(e - 127)``
  for ``e`` in 0..254 (255 is NaN). The shared exponent of a block follows the conversion
  rule of the OCP MX spec v1.0: ``floor(log2(amax)) - emax_elem``, with ``emax_elem = 2`` for
  E2M1 (its largest value is ``1.5 * 2**2``), clamped to the exponents E8M0 holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

# E2M1 -------------------------------------------------------------------------------------

E2M1_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_EMAX = 2  # floor(log2(6)): emax_elem of the OCP MX spec for FP4 elements
# The midpoints between neighbouring magnitudes; a magnitude exactly on one rounds to the even
# code: down at 0.25, 1.25, 2.5 and 5 (codes 0, 2, 4, 6), up at 0.75, 1.75 and 3.5.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)

# E4M3 -------------------------------------------------------------------------------------

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E4M3_MAX_MAGNITUDE_CODE = 0x7E  # 448; 0x7F is NaN

# E8M0 -------------------------------------------------------------------------------------

E8M0_BIAS = 127
E8M0_MAX_CODE = 254  # 2**127; 255 is NaN


def e2m1_values(device: torch.device | str | None = None) -> Tensor:
    """The 16 E2M1 values indexed by their 4-bit code, float32 (code 8 is -0.0)."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes])


def e2m1_magnitude_index(x: Tensor) -> Tensor:
    """The 3-bit magnitude code (0-7) of the E2M1 value nearest to ``|x|``, ties to even,
    saturating at 6 (code 7); int64, same shape as ``x``."""
    a = x.abs().float()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=a.device)
    index = torch.bucketize(a, midpoints, right=False)  # midpoints strictly below |x|
    ties_up = torch.zeros_like(a, dtype=torch.bool)
    for tie in _E2M1_TIES_UP:
        ties_up |= a == tie
    return index + ties_up


def e2m1_code(x: Tensor) -> Tensor:
    """The 4-bit code of the E2M1 value nearest to each element of ``x`` (uint8, same shape):
    ``sign << 3 | magnitude``, ties to even, saturating at ±6; a value that rounds to zero gets
    code 0, whatever its sign.

    Example: ``e2m1_code(torch.tensor([0.3, -2.6, 5.0, -7.0]))`` is ``[1, 13, 6, 15]``
    (0.5, -3, 4: the tie 5 goes to the even code of 4, -6 saturated).
    """
    magnitude = e2m1_magnitude_index(x)
    negative = (x < 0) & (magnitude > 0)
    return (magnitude + 8 * negative).to(torch.uint8)


def e2m1_value(code: Tensor) -> Tensor:
    """The E2M1 value of each 4-bit code (0-15, any integer or float dtype), float32."""
    return e2m1_values(code.device)[code.long()]


def round_to_e2m1(x: Tensor) -> Tensor:
    """Each element of ``x`` rounded to the nearest E2M1 value (float32; zero is +0.0)."""
    return e2m1_value(e2m1_code(x))


# E4M3 -------------------------------------------------------------------------------------


def round_to_e4m3(x: Tensor) -> Tensor:
    """Each element of ``x`` rounded to the nearest E4M3 (``fn``) value, ties to even,
    saturating at ±448; float32, same shape, zero as +0.0. Values below half the smallest
    subnormal (``2**-10``) become 0."""
    clamped = x.float().clamp(-E4M3_MAX, E4M3_MAX)
    return clamped.to(torch.float8_e4m3fn).float() + 0.0  # + 0.0 turns -0.0 into +0.0


def e4m3_code(x: Tensor) -> Tensor:
    """The 8-bit code (the bit pattern of ``torch.float8_e4m3fn``) of the E4M3 value nearest
    to each element of ``x``, rounded as :func:`round_to_e4m3` (uint8; zero is code 0).

    Example: ``e4m3_code(torch.tensor([1.0, -448.0, 2**-9]))`` is ``[0x38, 0xFE, 0x01]``.
    """
    return round_to_e4m3(x).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_value(code: Tensor) -> Tensor:
    """The E4M3 value of each 8-bit code (any integer or float dtype holding 0-255), float32.
    Codes 0x7F and 0xFF are the format's NaN; no rounding here produces them."""
    return code.to(torch.uint8).view(torch.float8_e4m3fn).float()


# E8M0 -------------------------------------------------------------------------------------


def floor_log2(x: Tensor) -> Tensor:
    """``floor(log2(x))`` of positive finite float32 values, exactly (read off the binary
    exponent, no logarithm rounding), int64; subnormals included."""
    _, exponent = torch.frexp(x.float())
    return exponent.long() - 1


def mx_shared_exponent(amax: Tensor, emax_elem: int = E2M1_EMAX) -> Tensor:
    """The E8M0 code of the shared scale of MX blocks whose largest magnitude is ``amax``.

    The OCP MX spec v1.0 conversion rule: ``X = 2**(floor(log2(amax)) - emax_elem)``, stored as the
    biased exponent ``floor(log2(amax)) - emax_elem + 127``, clamped to the 0..254 E8M0 holds.
    An all-zero block (``amax == 0``) gets code 0 (``2**-127``): any scale represents it, and
    compressed-tensors' observer writes the same code there.

    Args:
        amax: the largest magnitude of each block, any shape, non-negative and finite.
        emax_elem: the exponent of the element format's largest normal value (2 for E2M1).

    Returns:
        int64 E8M0 codes, same shape as ``amax``.
    """
    biased = floor_log2(amax) - emax_elem + E8M0_BIAS
    biased = torch.where(amax > 0, biased, torch.zeros_like(biased))
    return biased.clamp(0, E8M0_MAX_CODE)


def e8m0_value(code: Tensor) -> Tensor:
    """The scale ``2**(code - 127)`` of each E8M0 code (0..254), float32 (exact: ``2**-127``
    is a float32 subnormal)."""
    return torch.ldexp(torch.ones_like(code, dtype=torch.float32), code.long() - E8M0_BIAS)


def e8m0_code(scale: Tensor) -> Tensor:
    """The E8M0 code of power-of-two scales ``2**(code - 127)`` (int64), the inverse of
    :func:`e8m0_value` (of a value that is not a power of two: the code of the power of two
    below it)."""
    return floor_log2(scale) + E8M0_BIAS
