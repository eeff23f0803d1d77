import pytest
import torch
from torch import nn

from ppq_lightning import InvariantError, check_invariants
from ppq_lightning.compressed.state import (
    applied_stages,
    get_state,
    record_grid,
    record_mask,
    record_stage,
)
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.sharing import SharedBasisLinear, sharing_record
from ppq_lightning.ops.quant_grid import compute_grid


def _quantized_pruned_linear() -> nn.Linear:
    layer = nn.Linear(16, 4)
    mask = layer.weight.abs() > layer.weight.abs().median()
    record_mask(layer, mask)
    record_stage(layer, {"stage": "P", "kind": "P", "sparsity": 0.5})
    grid = compute_grid(layer.weight.data, 4)
    layer.weight.data = grid.fake_quantize(layer.weight.data)
    record_grid(layer, grid)
    record_stage(layer, {"stage": "Q", "kind": "Q", "bits": 4})
    return layer


def test_state_records_mask_grid_and_history():
    layer = _quantized_pruned_linear()
    state = get_state(layer)
    assert state.mask.dtype == torch.bool and state.mask.shape == layer.weight.shape
    # stored one bit per weight: the state dict holds the packed bits, not a bool per weight
    packed = layer.state_dict()["ppq_state.mask_bits"]
    assert packed.dtype == torch.uint8 and packed.numel() == -(-layer.weight.numel() // 8)
    assert state.bits == 4 and state.grid is not None
    assert state.stages == ["P", "Q"]
    assert check_invariants(layer) == 1


def test_check_invariants_catches_revived_weight():
    model = nn.Sequential(_quantized_pruned_linear())
    pruned = (~get_state(model[0]).mask).nonzero()[0]
    model[0].weight.data[tuple(pruned)] = get_state(model[0]).scale[pruned[0], 0]
    with pytest.raises(InvariantError, match=r"0: 1 pruned weight\(s\) are non-zero"):
        check_invariants(model)


def test_check_invariants_catches_off_grid_weight():
    model = nn.Sequential(_quantized_pruned_linear())
    kept = get_state(model[0]).mask.nonzero()[0]
    model[0].weight.data[tuple(kept)] += 0.37 * get_state(model[0]).scale[kept[0], 0]
    with pytest.raises(InvariantError, match="off the 4-bit grid"):
        check_invariants(model)


def test_state_survives_state_dict_into_a_fresh_model():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), _quantized_pruned_linear())
    fresh = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(16, 4))
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict: every key has a home
    state = get_state(fresh[2])
    assert torch.equal(state.mask, get_state(source[2]).mask)
    assert torch.equal(state.scale, get_state(source[2]).scale)
    assert state.bits == 4 and state.stages == ["P", "Q"]
    assert applied_stages(fresh) == {"P", "Q"}
    assert check_invariants(fresh) == 1


def test_bfloat16_weights_pass_on_their_grid():
    layer = _quantized_pruned_linear().to(torch.bfloat16)
    assert check_invariants(layer) == 1


def test_shared_basis_layers_are_rebuilt_before_loading():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(8, 6, bias=False))
    basis = nn.Linear(8, 3, bias=False)
    for index in (0, 2):
        coefficients = nn.Linear(3, 6, bias=index == 0)
        shared = SharedBasisLinear(basis, coefficients, "g")
        record_stage(shared, {"stage": "S", "kind": "S", "shared_basis": sharing_record(shared)})
        record_stage(coefficients, {"stage": "S", "kind": "S", "original_weights": 48})
        source[index] = shared
    record_stage(basis, {"stage": "S", "kind": "S", "original_weights": 0})
    fresh = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(8, 6, bias=False))
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict: every key has a home
    assert isinstance(fresh[0], SharedBasisLinear) and fresh[0].basis is fresh[2].basis
    assert fresh[2].coefficients.bias is None and fresh[0].rank == 3
    x = torch.randn(4, 8)
    assert torch.equal(fresh[0](x), source[0](x)) and torch.equal(fresh[2](x), source[2](x))
    assert applied_stages(fresh) == {"S"} and check_invariants(fresh) == 3
