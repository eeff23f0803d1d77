import pytest
import torch
from torch import nn

from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.sharing import (
    SHARED_BASIS,
    SharedBasisLinear,
    find_basis,
    new_shared_layer,
    plan_sharing,
    replay_shared_basis,
    share_group,
)
from ppq_lightning.errors import PPQConfigError
from tests.helpers import TINY_LLAMA, tiny_causal_lm, token_batches

ENTRY = {"stage": "BasisSharing", "method": "BasisSharing", "kind": "S", "group_size": 2}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.other = nn.Linear(8, 6, bias=False)


class _Net(nn.Module):
    def __init__(self, n_blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([_Block() for _ in range(n_blocks)])


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


# -- planning -------------------------------------------------------------------------------------
def test_plan_sharing_groups_consecutive_blocks_with_a_smaller_last_group():
    model = tiny_causal_lm(TINY_LLAMA, 3)
    groups = plan_sharing(model, _modules(model), ["q_proj"], group_size=2, rank=8)
    assert [(g.projection, g.names, g.rank) for g in groups] == [
        (
            "self_attn.q_proj",
            ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
            8,
        ),
        ("self_attn.q_proj", ["model.layers.2.self_attn.q_proj"], 8),
    ]
    layers = model.model.layers
    assert groups[0].layers[0] is layers[0].self_attn.q_proj
    assert groups[0].layers[1] is layers[1].self_attn.q_proj
    assert groups[1].layers == [layers[2].self_attn.q_proj]


def test_plan_sharing_makes_one_group_list_per_projection():
    model = tiny_causal_lm(TINY_LLAMA, 2)
    groups = plan_sharing(model, _modules(model), ["q_proj", "k_proj"], group_size=2, rank=4)
    assert [g.projection for g in groups] == ["self_attn.q_proj", "self_attn.k_proj"]
    assert all(len(g.names) == 2 for g in groups)


def test_plan_sharing_rank_from_ratio():
    model = tiny_causal_lm(TINY_LLAMA, 3)
    groups = plan_sharing(model, _modules(model), ["q_proj"], group_size=2, ratio=0.5)
    # floor(0.5 * g*64*64 / (64 + g*64)): 21 for g=2, 16 for g=1
    assert [g.rank for g in groups] == [21, 16]


def test_plan_sharing_only_takes_the_selected_modules():
    model = _Net()
    modules = {n: m for n, m in _modules(model).items() if not n.startswith("blocks.0.")}
    groups = plan_sharing(model, modules, ["proj"], group_size=2, rank=2)
    assert [g.names for g in groups] == [["blocks.1.proj", "blocks.2.proj"]]


def test_plan_sharing_refuses_a_group_size_larger_than_the_blocks():
    model = _Net()
    with pytest.raises(PPQConfigError, match=r"group_size=4 is not allowed.*from 2 to 3"):
        plan_sharing(model, _modules(model), ["proj"], group_size=4, rank=2)


def test_plan_sharing_refuses_a_projection_that_matches_nothing():
    model = _Net()
    with pytest.raises(PPQConfigError, match=r"projections \['q_proj'\] matched no selected"):
        plan_sharing(model, _modules(model), ["proj", "q_proj"], group_size=2, rank=2)


def test_plan_sharing_matches_a_projection_at_a_dot_boundary_only():
    model = tiny_causal_lm(TINY_LLAMA, 2)
    with pytest.raises(PPQConfigError, match=r"projections \['proj'\] matched no selected"):
        plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=2)


def test_plan_sharing_refuses_an_already_compressed_layer():
    model = _Net()
    record_stage(model.blocks[1].proj, {"stage": "P", "method": "MagnitudePruning", "kind": "P"})
    with pytest.raises(PPQConfigError, match=r"blocks.1.proj is already compressed by stages"):
        plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=2)


def test_plan_sharing_refuses_an_already_factorised_projection():
    model = _Net()
    (group, _) = plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=2)
    share_group(model, group, "g0", ENTRY)
    with pytest.raises(PPQConfigError, match=r"blocks.0.proj, which is already factorised"):
        plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=2)


def test_plan_sharing_refuses_layers_of_different_shapes_in_a_group():
    model = _Net()
    model.blocks[1].proj = nn.Linear(8, 5)
    with pytest.raises(PPQConfigError, match=r"share a basis but differ"):
        plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=2)


def test_plan_sharing_refuses_a_rank_above_the_group_maximum():
    model = _Net()
    with pytest.raises(
        PPQConfigError, match=r"rank=9 is not allowed: expected an integer from 1 to 8"
    ):
        plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=9)


def test_plan_sharing_refuses_a_ratio_giving_rank_zero():
    model = _Net()
    with pytest.raises(PPQConfigError, match=r"ratio=0.01 is not allowed.*rank 0"):
        plan_sharing(model, _modules(model), ["proj"], group_size=2, ratio=0.01)


def test_plan_sharing_needs_repeated_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(PPQConfigError, match=r"repeated blocks"):
        plan_sharing(model, _modules(model), ["0"], group_size=2, rank=1)


# -- sharing a group ------------------------------------------------------------------------------
def test_share_group_at_full_rank_keeps_every_layer_output():
    model = _Net()
    x = torch.randn(4, 8)
    before = {f"blocks.{i}.proj": model.blocks[i].proj(x) for i in range(3)}
    groups = plan_sharing(model, _modules(model), ["proj"], group_size=3, rank=8)
    share_group(model, groups[0], "proj:0", ENTRY)
    for name, expected in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SharedBasisLinear)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_share_group_members_hold_the_very_same_basis():
    model = _Net()
    (group, _) = plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=3)
    share_group(model, group, "proj:0", ENTRY)
    first, second = model.blocks[0].proj, model.blocks[1].proj
    assert first.basis is second.basis
    assert first.coefficients is not second.coefficients
    assert first.group == second.group == "proj:0" and first.rank == 3
    assert find_basis(model, "proj:0") is first.basis
    assert isinstance(model.blocks[2].proj, nn.Linear)  # the second group is not shared yet
    names = [n for n, _ in model.named_modules() if n.endswith(".basis")]
    assert names == ["blocks.0.proj.basis"]  # named_modules yields a shared basis once


def test_share_group_keeps_the_bias_and_requires_grad():
    model = _Net()
    bias = model.blocks[0].proj.bias.data.clone()
    model.blocks[0].proj.weight.requires_grad_(False)
    model.blocks[1].proj.weight.requires_grad_(False)
    (group, _) = plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=3)
    share_group(model, group, "proj:0", ENTRY)
    shared = model.blocks[0].proj
    assert torch.equal(shared.coefficients.bias.data, bias)
    assert shared.coefficients.bias.requires_grad
    assert not shared.basis.weight.requires_grad
    assert not shared.coefficients.weight.requires_grad


def test_share_group_records_the_edit_and_the_original_weights():
    model = _Net()
    (group, _) = plan_sharing(model, _modules(model), ["proj"], group_size=2, rank=3)
    metrics = share_group(model, group, "proj:0", ENTRY)
    record = {"group": "proj:0", "in_features": 8, "out_features": 6, "rank": 3, "bias": True}
    for index in (0, 1):
        shared = model.blocks[index].proj
        assert get_state(shared).history == [{**ENTRY, "edit": SHARED_BASIS, SHARED_BASIS: record}]
        assert get_state(shared.coefficients).history == [{**ENTRY, "original_weights": 48}]
    assert get_state(model.blocks[0].proj.basis).history == [{**ENTRY, "original_weights": 0}]
    assert sorted(metrics) == ["blocks.0.proj", "blocks.1.proj"]
    assert metrics["blocks.0.proj"]["params"] == 3 * 6
    assert metrics["blocks.0.proj"]["basis_params"] == 3 * 8
    assert metrics["blocks.0.proj"]["group_params"] == 3 * (8 + 2 * 6)
    assert metrics["blocks.0.proj"]["original_params"] == 48
    assert metrics["blocks.0.proj"]["group_size"] == 2
    assert 0 < metrics["blocks.0.proj"]["relative_error"] < 1


def test_share_group_of_a_llama_keeps_the_model_running():
    model = tiny_causal_lm(TINY_LLAMA, 2)
    groups = plan_sharing(model, _modules(model), ["up_proj"], group_size=2, rank=64)
    tokens = token_batches(1)[0]
    with torch.no_grad():
        before = model(tokens).logits
        share_group(model, groups[0], "up_proj:0", ENTRY)
        after = model(tokens).logits
    assert torch.allclose(after, before, atol=1e-4)


# -- building and replaying -----------------------------------------------------------------------
def test_new_shared_layer_has_the_shapes_and_dtype_asked_for():
    like = torch.empty(0, dtype=torch.float64)
    layer = new_shared_layer("g", 8, 6, 3, True, like)
    assert layer.basis.weight.shape == (3, 8) and layer.basis.bias is None
    assert layer.coefficients.weight.shape == (6, 3) and layer.coefficients.bias.shape == (6,)
    assert layer.basis.weight.dtype == layer.coefficients.weight.dtype == torch.float64
    assert (layer.in_features, layer.out_features, layer.rank, layer.group) == (8, 6, 3, "g")
    assert layer(torch.randn(2, 8, dtype=torch.float64)).shape == (2, 6)


def test_new_shared_layer_reuses_a_given_basis_and_defaults_to_float32():
    basis = nn.Linear(8, 3, bias=False)
    layer = new_shared_layer("g", 8, 6, 3, False, None, basis)
    assert layer.basis is basis and layer.coefficients.bias is None
    assert layer.coefficients.weight.dtype == torch.float32


def test_replay_shared_basis_rebuilds_the_shared_structure():
    source = _Net()
    (group, _) = plan_sharing(source, _modules(source), ["proj"], group_size=2, rank=3)
    share_group(source, group, "proj:0", ENTRY)
    fresh = _Net().double().eval()
    for index in (0, 1):
        entry = get_state(source.blocks[index].proj).history[0]
        replay_shared_basis(fresh, f"blocks.{index}.proj", entry)
    first, second = fresh.blocks[0].proj, fresh.blocks[1].proj
    assert isinstance(first, SharedBasisLinear) and first.basis is second.basis
    assert first.basis.weight.shape == (3, 8) and first.coefficients.weight.shape == (6, 3)
    assert first.coefficients.bias is not None and first.group == "proj:0"
    assert first.basis.weight.dtype == torch.float64 and not first.training


def test_a_shared_basis_state_dict_loads_into_a_fresh_model():
    source = _Net()
    (group, _) = plan_sharing(source, _modules(source), ["proj"], group_size=2, rank=3)
    share_group(source, group, "proj:0", ENTRY)
    fresh = _Net()
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict
    assert fresh.blocks[0].proj.basis is fresh.blocks[1].proj.basis
    x = torch.randn(4, 8)
    for index in (0, 1):
        assert torch.equal(fresh.blocks[index].proj(x), source.blocks[index].proj(x))


def test_replay_shared_basis_refuses_a_basis_of_another_shape():
    source = _Net()
    (group, _) = plan_sharing(source, _modules(source), ["proj"], group_size=2, rank=3)
    share_group(source, group, "proj:0", ENTRY)
    fresh = _Net()
    entry = get_state(source.blocks[0].proj).history[0]
    replay_shared_basis(fresh, "blocks.0.proj", entry)
    other = {**entry, SHARED_BASIS: {**entry[SHARED_BASIS], "rank": 2}}
    with pytest.raises(PPQConfigError, match=r"blocks.1.proj: the recorded shared basis \(2, 8\)"):
        replay_shared_basis(fresh, "blocks.1.proj", other)
