"""Integer codes packed into bytes: ``bits`` bits per code, least significant bit first.

A stream of codes ``c_0, c_1, ...`` in ``[0, 2**bits)`` is written as one bit string (bit ``j``
of code ``i`` at position ``i * bits + j``) cut into bytes, bit 0 of a byte first: two codes
per byte at 4 bits, four at 2 bits, a code straddling two bytes at 3, 5, 6 or 7 bits. A bool
mask is the case ``bits=1`` (``ops.masks.pack_mask``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppq_lightning.errors import bad_value

_BYTE_BITS = torch.tensor((1, 2, 4, 8, 16, 32, 64, 128), dtype=torch.uint8)


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take when packed."""
    return math.ceil(numel * bits / 8)


def _check_width(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise bad_value("bits", bits, "an integer from 1 to 8 (bits per packed code)")
    return bits


def pack_bits(stream: Tensor) -> Tensor:
    """Pack a stream of 0/1 values (any shape, flattened) into uint8 bytes, bit 0 first."""
    flat = stream.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BYTE_BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits, as bool ``(numel,)``."""
    return ((packed.flatten()[:, None] & _BYTE_BITS.to(packed.device)) != 0).flatten()[:numel]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes of any shape (values in ``[0, 2**bits)``) into uint8 bytes.

    Args:
        codes: integer or integral float tensor; flattened in row-major order.
        bits: bits per code, 1 to 8.

    Returns:
        uint8 tensor of ``packed_size(codes.numel(), bits)`` bytes.

    Raises:
        PPQConfigError: on a width outside 1-8 or a code outside ``[0, 2**bits)``.
    """
    _check_width(bits)
    flat = codes.flatten().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise bad_value(
            "codes", f"range [{int(flat.min())}, {int(flat.max())}]", f"[0, {2**bits - 1}]"
        )
    return pack_bits((flat[:, None] >> torch.arange(bits, device=flat.device)) & 1)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, as int64 ``(numel,)``.

    Raises:
        PPQConfigError: on a width outside 1-8 or fewer bytes than ``numel`` codes need.
    """
    _check_width(bits)
    if packed.numel() < packed_size(numel, bits):
        raise bad_value(
            "packed", f"{packed.numel()} bytes", f"at least {packed_size(numel, bits)} bytes"
        )
    stream = unpack_bits(packed, numel * bits).view(numel, bits).to(torch.int64)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)
