import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ppq_lightning.compressed.state import (
    current_grid,
    current_mask,
    get_state,
    record_grid,
    record_mask,
    record_stage,
)
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.lora import (
    ADAPTER,
    LORA_ADAPTERS,
    adapter_update,
    adapter_weights,
    check_adapter_records,
    lora_layers,
    merge_adapter,
    replay_lora_adapter,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.quant_grid import compute_grid

ENTRY = {
    "stage": "LoRAFineTune",
    "method": "LoRAFineTune",
    "kind": "L",
    "r": 2,
    "alpha": 4,
    "dropout": 0.0,
}


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 6)
        self.v_proj = nn.Linear(8, 6)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = _Attention()


def _inject(model: nn.Module, targets: list[str], r: int = 2, alpha: int = 4) -> None:
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def _with_trained_adapter(model: nn.Module) -> LoraLayer:
    """Inject an adapter on ``attn.q_proj`` and give it a nonzero update."""
    _inject(model, ["attn.q_proj"])
    layer = model.attn.q_proj
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.copy_(torch.randn(6, 2, generator=generator))
    return layer


# -- replaying a kept adapter ---------------------------------------------------------------------
def test_replay_lora_adapter_injects_an_adapter_of_the_recorded_rank():
    model = _Net()
    base = model.attn.q_proj
    replay_lora_adapter(model, "attn.q_proj.base_layer", {**ENTRY, "r": 3})
    layer = model.attn.q_proj
    assert isinstance(layer, LoraLayer) and layer.get_base_layer() is base
    assert layer.lora_A[ADAPTER].weight.shape == (3, 8)
    assert layer.lora_B[ADAPTER].weight.shape == (6, 3)
    assert layer.scaling[ADAPTER] == 4 / 3
    assert isinstance(model.attn.v_proj, nn.Linear)  # only the recorded target
    assert list(lora_layers(model)) == ["attn.q_proj"]


def test_replay_lora_adapter_uses_the_recorded_dropout():
    model = _Net()
    replay_lora_adapter(model, "attn.q_proj.base_layer", {**ENTRY, "dropout": 0.25})
    dropout = model.attn.q_proj.lora_dropout[ADAPTER]
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.25


def test_replay_lora_adapter_leaves_the_global_rng_state_alone():
    probe = _Net()
    state = torch.get_rng_state()
    _inject(probe, ["attn.q_proj"])
    assert not torch.equal(torch.get_rng_state(), state)  # a plain injection draws numbers
    model = _Net()
    state = torch.get_rng_state()
    replay_lora_adapter(model, "attn.q_proj.base_layer", ENTRY)
    assert torch.equal(torch.get_rng_state(), state)


def test_two_replays_target_both_layers_in_the_peft_config():
    model = _Net()
    replay_lora_adapter(model, "attn.q_proj.base_layer", ENTRY)
    replay_lora_adapter(model, "attn.v_proj.base_layer", ENTRY)
    assert set(model.peft_config[ADAPTER].target_modules) == {"attn.q_proj", "attn.v_proj"}
    assert sorted(lora_layers(model)) == ["attn.q_proj", "attn.v_proj"]


def test_a_kept_adapter_state_dict_loads_into_a_fresh_model():
    source = _Net()
    layer = _with_trained_adapter(source)
    base = layer.get_base_layer()
    record_stage(base, {**ENTRY, "edit": LORA_ADAPTERS, "adapter_weights": adapter_weights(layer)})
    fresh = _Net()
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict
    assert isinstance(fresh.attn.q_proj, LoraLayer)
    assert torch.equal(
        fresh.attn.q_proj.lora_B[ADAPTER].weight, source.attn.q_proj.lora_B[ADAPTER].weight
    )
    x = torch.randn(3, 8)
    assert torch.equal(fresh.attn.q_proj(x), source.attn.q_proj(x))
    assert get_state(fresh.attn.q_proj.base_layer).history == get_state(base).history


# -- checking the records -------------------------------------------------------------------------
def test_check_adapter_records_refuses_adapters_without_a_lora_record():
    source = _Net()
    _with_trained_adapter(source)
    with pytest.raises(PPQConfigError, match=r"on attn.q_proj but no LoRAFineTune record"):
        check_adapter_records(_Net(), source.state_dict())


def test_check_adapter_records_refuses_a_base_recorded_by_another_method():
    source = _Net()
    layer = _with_trained_adapter(source)
    record_stage(layer.get_base_layer(), {"stage": "P", "method": "MagnitudePruning", "kind": "P"})
    with pytest.raises(PPQConfigError, match=r"no LoRAFineTune record"):
        check_adapter_records(_Net(), source.state_dict())


def test_check_adapter_records_reads_keys_under_a_prefix():
    source = _Net()
    _with_trained_adapter(source)
    state_dict = {f"model.{k}": v for k, v in source.state_dict().items()}
    with pytest.raises(PPQConfigError, match=r"on attn.q_proj but no LoRAFineTune record"):
        check_adapter_records(_Net(), state_dict, prefix="model.")


def test_check_adapter_records_accepts_a_recorded_base():
    source = _Net()
    layer = _with_trained_adapter(source)
    record_stage(layer.get_base_layer(), {**ENTRY, "edit": LORA_ADAPTERS, "adapter_weights": 28})
    assert check_adapter_records(_Net(), source.state_dict()) is None


def test_check_adapter_records_accepts_adapters_the_model_already_has():
    source = _Net()
    _with_trained_adapter(source)
    target = _Net()
    _inject(target, ["attn.q_proj"])
    assert check_adapter_records(target, source.state_dict()) is None
    target.load_state_dict(source.state_dict())


def test_loading_unrecorded_adapters_into_a_fresh_model_raises():
    source = _Net()
    _with_trained_adapter(source)
    fresh = _Net()
    enable_state_loading(fresh)
    with pytest.raises(PPQConfigError, match=r"no LoRAFineTune record"):
        fresh.load_state_dict(source.state_dict())


# -- merging --------------------------------------------------------------------------------------
def test_adapter_weights_counts_r_times_in_plus_out():
    model = _Net()
    _inject(model, ["attn.q_proj"], r=3)
    assert adapter_weights(model.attn.q_proj) == 3 * (8 + 6)


def test_adapter_update_is_b_a_times_alpha_over_r():
    model = _Net()
    layer = _with_trained_adapter(model)
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    assert torch.allclose(adapter_update(layer), b @ a * (4 / 2))


def test_merge_adapter_of_a_plain_base_puts_it_back_with_the_update():
    model = _Net()
    layer = _with_trained_adapter(model)
    base = layer.get_base_layer()
    expected = base.weight.data + adapter_update(layer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = layer(x)
    lost = merge_adapter(model, "attn.q_proj", layer)
    assert lost == 0.0
    assert model.attn.q_proj is base and lora_layers(model) == {}
    assert torch.allclose(base.weight.data, expected)
    assert torch.allclose(model.attn.q_proj(x), out, atol=1e-6)


def test_merge_adapter_keeps_the_recorded_pruned_zeros():
    model = _Net()
    base = model.attn.q_proj
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    record_mask(base, mask)
    layer = _with_trained_adapter(model)
    merged = base.weight.data + adapter_update(layer)
    delta = adapter_update(layer)
    lost = merge_adapter(model, "attn.q_proj", layer)
    assert model.attn.q_proj is base and lora_layers(model) == {}
    assert torch.equal(current_mask(base), mask)
    assert (base.weight.data[~mask] == 0).all()
    assert torch.allclose(base.weight.data[mask], merged[mask])
    expected = (merged * ~mask).pow(2).sum() / delta.pow(2).sum()
    assert lost == pytest.approx(expected.item(), rel=1e-5) and lost > 0


def test_merge_adapter_keeps_the_recorded_grid():
    model = _Net()
    base = model.attn.q_proj
    grid = compute_grid(base.weight.data, 4)
    base.weight.data = grid.fake_quantize(base.weight.data)
    record_grid(base, grid)
    layer = _with_trained_adapter(model)
    lost = merge_adapter(model, "attn.q_proj", layer)
    assert model.attn.q_proj is base
    assert torch.equal(current_grid(base).scale, grid.scale)
    assert torch.equal(current_grid(base).zero, grid.zero)
    assert torch.equal(grid.fake_quantize(base.weight.data), base.weight.data)
    assert 0 < lost < 1
