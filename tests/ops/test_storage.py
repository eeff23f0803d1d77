import pytest

from ppq_lightning.ops.storage import SCALE_BITS, index_bits, sparse_is_smaller, weight_storage


def test_dense_quantized_matrix_by_hand():
    # 4 rows x 8 columns at 4 bits, one asymmetric group per row: 128 value bits, 4 x (16 + 4)
    storage = weight_storage(32, 4, groups=4, symmetric=False)
    assert (storage.payload_bits, storage.overhead_bits) == (128, 4 * (SCALE_BITS + 4))
    assert weight_storage(32, 4, groups=4).overhead_bits == 4 * SCALE_BITS  # symmetric


@pytest.mark.parametrize(
    ("numel", "nonzero", "bits", "m", "sparse"),
    [
        (100, 50, 16, None, True),  # 50 x 16 + 100 mask bits < 1600
        (100, 95, 16, None, False),  # 1520 + 100 > 1600
        (100, 50, 1, None, False),  # 50 + 100 > 100: a mask never pays at 1 bit
        (100, 50, 4, 4, True),  # 2:4: 50 x 4 + 50 x 2 index bits < 400
    ],
)
def test_sparse_storage_is_chosen_only_when_smaller(numel, nonzero, bits, m, sparse):
    assert sparse_is_smaller(numel, nonzero, bits, m) is sparse
    storage = weight_storage(numel, bits, nonzero=nonzero, nm_m=m)
    expected = nonzero * bits + index_bits(numel, nonzero, m) if sparse else numel * bits
    assert storage.total_bits == expected


def test_index_bits():
    assert (
        index_bits(100, 50) == 100 and index_bits(100, 50, 4) == 100 and index_bits(8, 4, 8) == 12
    )
