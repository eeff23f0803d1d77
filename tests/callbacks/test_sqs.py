import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import SQS, RTNQuantization
from ppq_lightning.callbacks.sqs import POSTERIOR_NAME
from ppq_lightning.compressed.state import current_grid, current_mask, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.transforms import has_weight_transform
from ppq_lightning.modules.views import weight_matrix
from tests.helpers import TINY_LLAMA, make_trainer

WINDOWS = (torch.arange(32) % 8 + 10).repeat(3, 1)


# a tiny lr (1e-3) with a large logit_scale: the inclusion logits move 0.1 per step
FAST = {"bits": 4, "prior_inclusion": 0.2, "init_inclusion": 0.55, "logit_scale": 100.0}


def memorisable() -> DataLoader:
    return DataLoader(list(WINDOWS), batch_size=1, shuffle=False)


def module(lr: float = 1e-3, seed: int = 0) -> CausalLMModule:
    return CausalLMModule(model_config=TINY_LLAMA, seed=seed, learning_rate=lr)


def fit_sqs(tmp_path, steps: int = 6, model=None, after=(), **sqs):
    model = module() if model is None else model
    stage = SQS(**{**FAST, **sqs})
    trainer = make_trainer(tmp_path, [stage, *after], max_steps=steps)
    trainer.fit(model, train_dataloaders=memorisable())
    return model, stage, trainer


def test_a_larger_kl_weight_gives_more_zeros(tmp_path):
    _, weak, _ = fit_sqs(tmp_path / "a", kl_weight=0.0)
    _, strong, trainer = fit_sqs(tmp_path / "b", kl_weight=50.0)
    assert strong.result.summary.sparsity > weak.result.summary.sparsity + 0.2
    logged = trainer.callback_metrics
    assert {"sqs/kl", "sqs/sparsity", "sqs/temperature"} <= set(logged)
    for metrics in strong.result.layers.values():
        assert set(metrics) == {"sparsity", "bits", "levels_used", "weight_error"}


def test_collapsed_weights_lie_on_the_grid_with_exact_zeros(tmp_path):
    model, stage, _ = fit_sqs(tmp_path, kl_weight=5.0, bits=3)
    modules = resolve_targets(model)
    assert check_invariants(model) == len(modules) == 14
    assert not any(POSTERIOR_NAME in key for key in model.state_dict())
    for layer in modules.values():
        assert not has_weight_transform(layer)
        w, mask, grid = weight_matrix(layer), current_mask(layer), current_grid(layer)
        assert torch.equal(mask, w != 0)
        assert grid.bits == 3 and grid.symmetric
        torch.testing.assert_close(grid.fake_quantize(w), w, rtol=0, atol=0)
        assert [h["kind"] for h in get_state(layer).history] == ["PQ"]
    assert stage.result.summary.avg_bits == 3


def test_invariants_hold_through_a_later_stage(tmp_path):
    model, _, _ = fit_sqs(tmp_path, kl_weight=5.0, after=[RTNQuantization(bits=2, name="Q")])
    assert check_invariants(model) == 14
    layer = model.model.model.layers[0].mlp.up_proj
    assert [h["kind"] for h in get_state(layer).history] == ["PQ", "Q"]
    assert current_grid(layer).bits == 2
    assert (weight_matrix(layer)[~current_mask(layer)] == 0).all()  # SQS's zeros stay


def test_resumed_fit_equals_uninterrupted(tmp_path):
    straight, _, _ = fit_sqs(tmp_path / "a", kl_weight=5.0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    stage = SQS(**FAST, kl_weight=5.0, anneal_steps=6)
    trainer = make_trainer(tmp_path / "b", [stage, saver], max_steps=3, enable_checkpointing=True)
    trainer.fit(module(), train_dataloaders=memorisable())
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    resumed = module(seed=1)
    stage = SQS(**FAST, kl_weight=5.0)
    make_trainer(tmp_path / "c", [stage], max_steps=6).fit(
        resumed, train_dataloaders=memorisable(), ckpt_path=ckpt
    )
    expected = straight.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, expected[key]), key
        else:
            assert value == expected[key], key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, "bits=1 is not allowed"),
        ({"bits": 9}, "bits=9"),
        ({"kl_weight": -1}, "kl_weight=-1"),
        ({"prior_inclusion": 0}, "prior_inclusion=0"),
        ({"prior_inclusion": 1.0}, "prior_inclusion=1.0"),
        ({"init_inclusion": 1.5}, "init_inclusion=1.5"),
        ({"prior_sigma": 0}, "prior_sigma=0"),
        ({"sigma": -1}, "sigma=-1"),
        ({"temperature": 0}, "temperature=0"),
        ({"min_temperature": 2.0}, r"min_temperature=2.0 .* at most temperature=1.0"),
        ({"anneal_steps": 0}, "anneal_steps=0"),
        ({"kl_warmup_steps": -1}, "kl_warmup_steps=-1"),
        ({"seed": "x"}, "seed='x'"),
        ({"logit_scale": 0}, "logit_scale=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        SQS(**kwargs)


def test_no_anneal_steps_and_no_max_steps_is_refused(tmp_path):
    stage = SQS(bits=4)
    trainer = make_trainer(tmp_path, [stage], max_epochs=1)
    with pytest.raises(PPQConfigError, match="anneal_steps=None"):
        trainer.fit(module(), train_dataloaders=memorisable())
