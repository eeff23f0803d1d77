import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.compressed.state import applied_stages, get_state, record_stage
from ppq_lightning.edits.loading import enable_state_loading, require_state_loading
from ppq_lightning.edits.sharing import SharedBasisLinear, sharing_record
from ppq_lightning.errors import PPQConfigError
from tests.compressed.helpers import quantized_pruned_linear


def test_state_survives_state_dict_into_a_fresh_model():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), quantized_pruned_linear())
    fresh = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(16, 4))
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict: every key has a home
    state = get_state(fresh[2])
    assert torch.equal(state.mask, get_state(source[2]).mask)
    assert torch.equal(state.scale, get_state(source[2]).scale)
    assert state.bits == 4 and state.stages == ["P", "Q"]
    assert applied_stages(fresh) == {"P", "Q"}
    assert check_invariants(fresh) == 1


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


def test_without_state_loading_a_compressed_state_dict_is_refused_with_the_way_out():
    source = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), quantized_pruned_linear())
    fresh = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(16, 4))
    require_state_loading(fresh)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PPQConfigError, match=r"1 layer\(s\) \(e\.g\. 2\.ppq_state\).*enable_state"):
        fresh.load_state_dict(source.state_dict())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # untouched
    fresh.load_state_dict(nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(16, 4)).state_dict())
    enable_state_loading(fresh)  # registered later, and the guard steps aside
    fresh.load_state_dict(source.state_dict())
    assert check_invariants(fresh) == 1
