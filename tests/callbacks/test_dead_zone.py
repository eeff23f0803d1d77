import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import MagnitudePruning
from ppq_lightning.callbacks.dead_zone import QUANTIZER_NAME, DeadZoneQuantization
from ppq_lightning.compressed.state import current_grid, current_mask, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.transforms import has_weight_transform
from ppq_lightning.modules.views import weight_matrix
from tests.helpers import TINY_LLAMA, make_trainer

WINDOWS = (torch.arange(32) % 8 + 10).repeat(3, 1)


def memorisable() -> DataLoader:
    """Three windows of one phrase, in the same order every epoch."""
    return DataLoader(list(WINDOWS), batch_size=1, shuffle=False)


def module(lr: float = 5e-2, seed: int = 0) -> CausalLMModule:
    # Adam moves theta by about lr per step: a large rate shows the regulariser in 6 steps
    return CausalLMModule(model_config=TINY_LLAMA, seed=seed, learning_rate=lr)


def fit_codeq(tmp_path, steps: int = 6, model=None, before=(), **codeq):
    model = module() if model is None else model
    stage = DeadZoneQuantization(**{"bits": 4, "init_dead_zone": 0.2, **codeq})
    trainer = make_trainer(tmp_path, [*before, stage], max_steps=steps)
    trainer.fit(model, train_dataloaders=memorisable())
    return model, stage, trainer


def test_larger_sparsity_weight_learns_a_wider_dead_zone(tmp_path):
    torch.manual_seed(0)
    _, weak, _ = fit_codeq(tmp_path / "a", sparsity_weight=0.0)
    torch.manual_seed(0)
    _, strong, trainer = fit_codeq(tmp_path / "b", sparsity_weight=10.0)
    assert strong.result.summary.sparsity > weak.result.summary.sparsity + 0.03
    zones = {
        stage: [m["dead_zone"] for m in stage.result.layers.values()] for stage in (weak, strong)
    }
    assert sum(zones[strong]) / 14 > sum(zones[weak]) / 14 + 0.03
    assert min(zones[strong]) > 0.24  # from 0.2: the regulariser widened every dead zone
    for metrics in strong.result.layers.values():
        assert set(metrics) == {"sparsity", "bits", "dead_zone", "weight_error"}
        assert metrics["bits"] == 4 and 0 < metrics["sparsity"] < 1
    logged = trainer.callback_metrics
    assert {"codeq/regulariser", "codeq/sparsity", "codeq/avg_bits"} <= set(logged)
    assert float(logged["codeq/regulariser"]) > 0 and float(logged["codeq/avg_bits"]) == 4


def test_dead_zone_weights_are_exact_zeros_on_a_recorded_grid_and_mask(tmp_path):
    model, stage, _ = fit_codeq(
        tmp_path, before=[MagnitudePruning(sparsity=0.3, name="P")], sparsity_weight=1.0
    )
    modules = resolve_targets(model)
    assert check_invariants(model) == len(modules) == 14
    assert not any(QUANTIZER_NAME in key for key in model.state_dict())  # parameters removed
    optimizer = stage._trainer.optimizers[0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for name, layer in modules.items():
        assert not has_weight_transform(layer)
        w, mask, grid = weight_matrix(layer), current_mask(layer), current_grid(layer)
        assert torch.equal(mask, w != 0)  # the dead zone (and earlier mask) is the mask
        assert grid.symmetric and grid.bits == 4 and grid.scale.shape == (w.shape[0], 1)
        history = get_state(layer).history
        assert [h["kind"] for h in history] == ["P", "PQ"]
        sparsity = stage.result.layers[name]["sparsity"]
        assert history[-1]["sparsity"] == sparsity >= 0.3  # the earlier zeros stay zeros
        # every kept weight lies beyond the dead zone d = dead_zone * max|w| of its row
        levels = (grid.quantize(w) - grid.zero).abs()
        assert (levels[mask] >= 1).all()
    summary = stage.result.summary
    assert summary.avg_bits == 4 and summary.sparsity >= 0.3 and summary.nominal_C > 4 / 0.7


def test_learned_bits_fall_under_a_bits_weight_and_stay_in_range(tmp_path):
    model, stage, trainer = fit_codeq(
        tmp_path, steps=8, model=module(lr=0.1), bits=3, learn_bits=True, bits_weight=100.0
    )
    bits = {name: m["bits"] for name, m in stage.result.layers.items()}
    assert set(bits.values()) == {2.0}  # 3 - 8 * 0.1 -> 2.2 -> 2, clamped at 2 from then on
    for name, layer in resolve_targets(model).items():
        assert current_grid(layer).bits == 2, name
    assert check_invariants(model) == 14
    assert float(trainer.callback_metrics["codeq/avg_bits"]) == 2


def test_resumed_fit_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    straight, _, _ = fit_codeq(tmp_path / "a", sparsity_weight=5.0)

    torch.manual_seed(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    stage = DeadZoneQuantization(bits=4, init_dead_zone=0.2, sparsity_weight=5.0)
    trainer = make_trainer(tmp_path / "b", [stage, saver], max_steps=3, enable_checkpointing=True)
    trainer.fit(module(), train_dataloaders=memorisable())
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    thetas = [k for k in saved["state_dict"] if k.endswith(f"{QUANTIZER_NAME}.theta")]
    assert len(thetas) == 14 and all(saved["state_dict"][k] != 0 for k in thetas)

    torch.manual_seed(0)
    resumed = module(seed=1)  # other initial weights: everything must come from the checkpoint
    stage = DeadZoneQuantization(bits=4, init_dead_zone=0.2, sparsity_weight=5.0)
    make_trainer(tmp_path / "c", [stage], max_steps=6).fit(
        resumed, train_dataloaders=memorisable(), ckpt_path=ckpt
    )
    expected = straight.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
        elif torch.is_tensor(value):
            assert torch.equal(value, expected[key]), key
    layer = resumed.model.model.layers[0].self_attn.q_proj
    assert [h["kind"] for h in get_state(layer).history] == ["PQ"]


def test_a_checkpoint_of_the_finished_stage_is_not_compressed_again(tmp_path):
    model, _, trainer = fit_codeq(tmp_path, steps=3, sparsity_weight=1.0)
    ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(ckpt)
    compressed = weight_matrix(model.model.model.layers[0].mlp.up_proj).clone()

    fresh = module(lr=1e-3, seed=1)
    stage = DeadZoneQuantization(bits=4, init_dead_zone=0.2, sparsity_weight=1.0)
    make_trainer(tmp_path, [stage], max_steps=5).fit(
        fresh, train_dataloaders=memorisable(), ckpt_path=ckpt
    )
    assert stage.result is None  # recognised as applied: fine-tuning only
    layer = fresh.model.model.layers[0].mlp.up_proj
    assert [h["kind"] for h in get_state(layer).history] == ["PQ"]
    assert not has_weight_transform(layer) and not hasattr(layer, QUANTIZER_NAME)
    assert torch.equal(current_mask(layer), compressed != 0)
    assert check_invariants(fresh) == 14  # fine-tuned on the recorded mask and grid


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, "bits=1 is not allowed: expected an integer from 2 to 8"),
        ({"bits": 9}, "bits=9"),
        ({"sparsity_weight": -0.1}, r"sparsity_weight=-0.1 is not allowed: expected a number >= 0"),
        ({"bits_weight": -1}, "bits_weight=-1"),
        ({"bits_weight": 0.1}, r"bits_weight=0.1 .* 0 unless learn_bits=True"),
        ({"learn_bits": "yes"}, "learn_bits='yes'"),
        ({"init_dead_zone": 1.0}, r"init_dead_zone=1.0 .* a number in \[0, 1\)"),
        ({"init_dead_zone": -0.1}, "init_dead_zone=-0.1"),
        ({"temperature": 0}, "temperature=0 is not allowed: expected a number > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        DeadZoneQuantization(**kwargs)


def test_codeq_is_not_a_stage_to_apply_at_once():
    model = module()
    with pytest.raises(PPQConfigError, match=r"DeadZoneQuantization trains: .* not in apply\(\)"):
        DeadZoneQuantization(bits=4).apply(model)
    assert not any(hasattr(m, QUANTIZER_NAME) for m in model.modules())


def test_codeq_outside_fit_is_an_error(tmp_path, tiny_data):
    with pytest.raises(PPQConfigError, match="DeadZoneQuantization trains: it belongs in `fit`"):
        make_trainer(tmp_path, [DeadZoneQuantization(bits=4)]).validate(
            module(), datamodule=tiny_data
        )


def test_an_interrupted_fit_leaves_a_plain_model(tmp_path):
    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise RuntimeError("crash")

    model, stage = module(), DeadZoneQuantization(bits=4, sparsity_weight=1.0)
    with pytest.raises(RuntimeError, match="crash"):
        make_trainer(tmp_path, [stage, Crash()], max_steps=3).fit(
            model, train_dataloaders=memorisable()
        )
    assert stage.result is None and not any(has_weight_transform(m) for m in model.modules())
    assert not any(QUANTIZER_NAME in key for key in model.state_dict())
    assert get_state(model.model.model.layers[0].mlp.up_proj) is None  # nothing recorded
