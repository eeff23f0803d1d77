import torch

from ppq_lightning import check_invariants
from ppq_lightning.compressed.state import get_state
from tests.compressed.helpers import quantized_pruned_linear


def test_state_records_mask_grid_and_history():
    layer = quantized_pruned_linear()
    state = get_state(layer)
    assert state.mask.dtype == torch.bool and state.mask.shape == layer.weight.shape
    # stored one bit per weight: the state dict holds the packed bits, not a bool per weight
    packed = layer.state_dict()["ppq_state.mask_bits"]
    assert packed.dtype == torch.uint8 and packed.numel() == -(-layer.weight.numel() // 8)
    assert state.bits == 4 and state.grid is not None
    assert state.stages == ["P", "Q"]
    assert check_invariants(layer) == 1
