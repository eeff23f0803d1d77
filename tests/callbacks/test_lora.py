import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    CompressionSchedule,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
)
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.compressed.state import current_grid, current_mask, get_state
from ppq_lightning.edits.lora import lora_layers
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer

# three windows of one short repeating phrase: a dataset a small LoRA memorises in a few steps
WINDOWS = (torch.arange(32) % 8 + 10).repeat(3, 1)


def memorisable() -> DataLoader:
    """The three windows, in the same order every epoch."""
    return DataLoader(list(WINDOWS), batch_size=1, shuffle=False)


def module(lr: float = 1e-2) -> CausalLMModule:
    return CausalLMModule(model_config=TINY_LLAMA, seed=0, learning_rate=lr)


class Probe(L.Callback):
    """Snapshots the base weights when training starts, and the training losses."""

    def __init__(self) -> None:
        self.bases: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        for name, layer in lora_layers(pl_module).items():
            self.bases[name] = layer.get_base_layer().weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def compressed_stages(merge: str = "never", **lora):
    return [
        MagnitudePruning(sparsity=0.5, name="P"),
        RTNQuantization(bits=4, name="Q"),
        LoRAFineTune(r=4, name="L", merge=merge, **lora),
    ]


def test_lora_trains_adapters_over_a_frozen_compressed_base(tmp_path):
    model, probe, stages = module(), Probe(), compressed_stages()
    trainer = make_trainer(tmp_path, [*stages, probe], max_epochs=5)
    trainer.fit(model, train_dataloaders=memorisable())
    layers = lora_layers(model)
    assert len(layers) == 14 and probe.bases.keys() == layers.keys()
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert torch.equal(base.weight, probe.bases[name]), name  # bit for bit
        assert not base.weight.requires_grad
        assert (base.weight[~current_mask(base)] == 0).all()
        assert current_grid(base).off_grid_distance(base.weight).max() < 1e-4
        assert layer.lora_B["default"].weight.abs().sum() > 0  # adapters moved
    assert check_invariants(model) == 14
    # a frozen random tied head caps the logits (loss >= ~4.7 here): the test asks for progress
    assert sum(probe.losses[-3:]) < 0.9 * sum(probe.losses[:3])
    history = get_state(layers["model.model.layers.0.self_attn.q_proj"].get_base_layer()).history
    assert [h["kind"] for h in history] == ["P", "Q", "L"]
    assert history[-1]["adapter_weights"] == 4 * (64 + 64)
    before, after = stages[1].result.summary, stages[2].result.summary
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    stored_before = 16 * before.n_weights / before.measured_C
    assert after.measured_C == pytest.approx(16 * after.n_weights / (stored_before + 16 * adapters))


def test_merge_reprojects_onto_mask_and_grid(tmp_path):
    model = module()
    stages = compressed_stages(merge="at_end")
    make_trainer(tmp_path, stages, max_steps=6).fit(model, train_dataloaders=memorisable())
    assert lora_layers(model) == {}  # adapters merged and removed
    assert check_invariants(model) == 14
    layers = stages[-1].result.layers
    assert all(0 < v["projection_loss"] <= 1.5 for v in layers.values())
    assert all(p.requires_grad for p in model.parameters())  # trainable again after the merge
    summary = compression_summary(model)
    assert summary.sparsity >= 0.5 and summary.avg_bits == 4


def test_merge_into_a_2_4_base_without_reprojection_is_refused_before_training(tmp_path):
    model, probe = module(), Probe()
    stages = [
        MagnitudePruning(pattern="2:4", name="P"),
        LoRAFineTune(r=2, merge="at_end", reproject=False),
    ]
    with pytest.raises(PPQConfigError, match="reproject=False is not allowed"):
        make_trainer(tmp_path, [*stages, probe], max_steps=2).fit(
            model, train_dataloaders=memorisable()
        )
    assert probe.losses == []


def test_order_q_then_l_then_p_in_a_schedule(tmp_path, tiny_data):
    model = module()
    stages = compressed_stages(merge="at_end")
    schedule = CompressionSchedule(stages, order="Q>L>P", output_dir=str(tmp_path))
    trainer = make_trainer(tmp_path, [schedule], max_steps=4, limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_data)
    assert [r.name for r in schedule.results] == ["Q", "L", "P"]
    assert all("ppl" in r.evaluation for r in schedule.results)
    assert check_invariants(model) == 14
    assert (tmp_path / "schedule.csv").read_text().count("\n") == 5  # header, dense, 3 stages


def test_pruning_after_unmerged_adapters_states_what_it_does(tmp_path):
    model = module()
    stages = [
        LoRAFineTune(r=2, name="L"),
        MagnitudePruning(sparsity=0.5, name="P"),
    ]
    with pytest.warns(UserWarning, match="adapters stay dense"):
        make_trainer(tmp_path, stages, max_steps=2).fit(model, train_dataloaders=memorisable())
    base = lora_layers(model)["model.model.layers.0.mlp.up_proj"].get_base_layer()
    assert [h["kind"] for h in get_state(base).history] == ["L", "P"]  # P fired after training


def test_resumed_fit_equals_uninterrupted_and_applies_nothing_twice(tmp_path):
    torch.manual_seed(0)
    straight = module()
    make_trainer(tmp_path / "a", compressed_stages(), max_steps=6).fit(
        straight, train_dataloaders=memorisable()
    )

    torch.manual_seed(0)
    first = module()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(
        tmp_path / "b", [*compressed_stages(), saver], max_steps=3, enable_checkpointing=True
    )
    trainer.fit(first, train_dataloaders=memorisable())
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))

    torch.manual_seed(0)
    resumed = CausalLMModule(model_config=TINY_LLAMA, seed=1, learning_rate=1e-2)
    stages = compressed_stages()
    make_trainer(tmp_path / "c", stages, max_steps=6).fit(
        resumed, train_dataloaders=memorisable(), ckpt_path=ckpt
    )
    assert stages[0].result is None and stages[1].result is None  # P, Q not re-applied
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    state = get_state(lora_layers(resumed)["model.model.layers.1.mlp.down_proj"].get_base_layer())
    assert [h["kind"] for h in state.history] == ["P", "Q", "L"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r=0"),
        ({"r": 2.5}, "r=2.5"),
        ({"alpha": 0}, "alpha=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"merge": "sometimes"}, "merge='sometimes'"),
        ({"target_modules": "q_proj", "targets": "k_proj"}, "not allowed together"),
        ({"reproject": "no"}, "reproject='no' is not allowed: expected true or false"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        LoRAFineTune(**kwargs)


def test_target_modules_matching_nothing(tmp_path):
    with pytest.raises(PPQConfigError, match="matched no"):
        make_trainer(tmp_path, [LoRAFineTune(target_modules="nothing_here")], max_steps=1).fit(
            module(), train_dataloaders=memorisable()
        )


def test_lora_apply_is_a_clear_error_not_an_empty_not_implemented():
    model = module()
    with pytest.raises(PPQConfigError, match=r"LoRAFineTune trains: it belongs in `fit`.*apply"):
        LoRAFineTune().apply(model)
    assert not lora_layers(model)


def test_lora_outside_fit_is_an_error(tmp_path, tiny_data):
    with pytest.raises(PPQConfigError, match="belongs in `fit`"):
        make_trainer(tmp_path, [LoRAFineTune()]).validate(module(), datamodule=tiny_data)


def test_split_pruning_around_fine_tuning_p1_q_l_p2(tmp_path, tiny_data):
    stages = [
        MagnitudePruning(sparsity=0.3, name="P1"),
        MagnitudePruning(sparsity=0.6, name="P2"),
        RTNQuantization(bits=4, name="Q"),
        LoRAFineTune(r=2, name="L", merge="at_end"),
    ]
    schedule = CompressionSchedule(stages, order="P1>Q>L>P2", output_dir=str(tmp_path))
    model = module()
    make_trainer(tmp_path, [schedule], max_steps=2, limit_val_batches=1).fit(
        model, datamodule=tiny_data
    )
    assert [r.name for r in schedule.results] == ["P1", "Q", "L", "P2"]
    sparsity = [r.summary.sparsity for r in schedule.results]
    assert sparsity[0] == pytest.approx(0.3, abs=0.01) and sparsity[-1] >= 0.6
    assert check_invariants(model) == 14


def test_unmerged_adapters_load_into_a_fresh_model(tmp_path):
    """A checkpoint with unmerged adapters loads (strict) into a fresh model outside fit: the
    adapters are re-injected with the saved rank and the recorded alpha/dropout."""
    from ppq_lightning.edits.loading import enable_state_loading

    trained = module()
    stages = compressed_stages(alpha=8.0)
    make_trainer(tmp_path, stages, max_epochs=2).fit(trained, train_dataloaders=memorisable())
    fresh = module()
    enable_state_loading(fresh)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    layers = lora_layers(fresh)
    assert len(layers) == 14
    layer = layers["model.model.layers.0.self_attn.q_proj"]
    assert layer.r["default"] == 4 and layer.lora_alpha["default"] == 8.0
    with torch.no_grad():
        ids = WINDOWS[:1]
        torch.testing.assert_close(fresh.model(ids).logits, trained.model(ids).logits)
    assert check_invariants(fresh) == 14
    assert compression_summary(fresh) == compression_summary(trained)


def test_adapters_without_a_lora_record_are_refused():
    from peft import LoraConfig, inject_adapter_in_model

    from ppq_lightning.edits.loading import enable_state_loading

    foreign = module()
    config = LoraConfig(r=2, target_modules=["q_proj"], bias="none")
    inject_adapter_in_model(config, foreign, adapter_name="default")
    fresh = module()
    enable_state_loading(fresh)
    with pytest.raises(PPQConfigError, match="no LoRAFineTune record"):
        fresh.load_state_dict(foreign.state_dict())
