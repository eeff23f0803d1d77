import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.masks import pack_mask, unpack_mask
from ppq_lightning.ops.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_round_trip_at_every_width(bits):
    codes = torch.randint(0, 2**bits, (37, 11), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(37, 11), codes)


def test_layout_is_least_significant_bit_first():
    assert pack_codes(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]
    assert pack_codes(torch.tensor([1, 0, 3, 2]), 2).tolist() == [0b10110001]
    # 3 bits: codes straddle bytes; 8 codes fill exactly 3 bytes
    assert packed_size(8, 3) == 3 and pack_codes(torch.full((8,), 7), 3).tolist() == [255] * 3


def test_a_mask_is_the_one_bit_case():
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(pack_mask(mask), pack_codes(mask, 1))
    assert torch.equal(unpack_mask(pack_mask(mask), (5, 7)), mask)


def test_bad_codes_and_widths_are_refused():
    with pytest.raises(PPQConfigError, match=r"codes='range \[0, 16\]' is not allowed"):
        pack_codes(torch.tensor([0, 16]), 4)
    with pytest.raises(PPQConfigError, match="bits=9"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(PPQConfigError, match="at least 2 bytes"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 4, 3)
