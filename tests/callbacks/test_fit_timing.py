"""When compression stages fire in ``fit``: at fit start, at an epoch or step, after a training
stage, or gradually; and the compressed state survives the optimizer steps in between."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import LoRAFineTune, MagnitudePruning, RTNQuantization
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer

LAYER = "model.model.layers.0.mlp.up_proj"


def loader() -> DataLoader:
    windows = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    return DataLoader(list(windows), batch_size=1)  # 4 steps per epoch


def module() -> CausalLMModule:
    return CausalLMModule(model_config=TINY_LLAMA, seed=0, learning_rate=1e-2)


class Watch(L.Callback):
    """Records, before each training batch, the step, epoch and sparsity of one layer."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weight = pl_module.get_submodule(LAYER).weight
        sparsity = (weight == 0).float().mean().item()
        self.seen.append((trainer.global_step, trainer.current_epoch, sparsity))


def fit(tmp_path, callbacks, **kwargs):
    model = module()
    make_trainer(tmp_path, callbacks, **kwargs).fit(model, train_dataloaders=loader())
    return model


def test_at_epoch_fires_at_the_start_of_that_epoch_and_masks_survive_training(tmp_path):
    watch = Watch()
    model = fit(tmp_path, [MagnitudePruning(sparsity=0.5, at_epoch=1), watch], max_epochs=3)
    before = [s for step, epoch, s in watch.seen if epoch == 0]
    after = [s for step, epoch, s in watch.seen if epoch >= 1]
    assert max(before) < 0.01 and min(after) >= 0.5  # pruned at epoch 1, zeros kept after
    assert check_invariants(model) == 14


def test_at_step_fires_before_that_batch(tmp_path):
    watch = Watch()
    fit(tmp_path, [MagnitudePruning(sparsity=0.5, at_step=3), watch], max_steps=6)
    assert [s >= 0.5 for _, _, s in watch.seen] == [False, False, False, True, True, True]


def test_quantized_layers_stay_on_their_grid_through_plain_fine_tuning(tmp_path):
    model = fit(tmp_path, [MagnitudePruning(sparsity=0.5), RTNQuantization(bits=4)], max_steps=4)
    assert check_invariants(model) == 14  # projected back after every optimizer step


def test_a_stage_after_a_training_stage_fires_when_training_ends(tmp_path):
    watch, pruning = Watch(), MagnitudePruning(sparsity=0.5, name="P")
    model = fit(tmp_path, [LoRAFineTune(r=2, name="L"), pruning, watch], max_steps=3)
    assert all(s < 0.01 for _, _, s in watch.seen)  # not pruned while training
    base = model.get_submodule(LAYER).get_base_layer()
    assert [h["kind"] for h in get_state(base).history] == ["L", "P"]
    assert (base.weight == 0).float().mean() >= 0.5


def test_gradual_ramp_follows_the_cubic_schedule(tmp_path):
    watch = Watch()
    ramp = {"start_step": 1, "end_step": 7, "every": 2}
    pruning = MagnitudePruning(sparsity=0.6, ramp=ramp)
    model = fit(tmp_path, [pruning, watch], max_steps=9)
    sparsity = {step: s for step, _, s in watch.seen}
    assert sparsity[0] < 0.01
    for step in (1, 3, 5):  # pruned before the batch of that step
        assert sparsity[step] == pytest.approx(pruning.ramp_sparsity(step), abs=0.01)
    assert pruning.ramp_sparsity(1) == 0 and pruning.ramp_sparsity(7) == 0.6
    assert sparsity[2] == sparsity[1] and min(sparsity[7], sparsity[8]) > 0.599
    history = get_state(model.get_submodule(LAYER)).history
    assert len(history) == 1 and history[0]["ramp"]["end_step"] == 7  # recorded once, at the end


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"at_epoch": -1}, "at_epoch=-1"),
        ({"at_step": 1.5}, "at_step=1.5"),
        ({"at_epoch": 1, "at_step": 2}, "not allowed together"),
        ({"ramp": {"start_step": 4, "end_step": 2}}, "ramp.end_step=2"),
        ({"ramp": {"end_step": 5, "every": 0}}, "ramp.every=0"),
        ({"ramp": {"end_step": 5, "initial_sparsity": 0.7}}, "ramp.initial_sparsity=0.7"),
        ({"ramp": {"end_step": 5, "speed": 2}}, "ramp="),
        ({"ramp": {"end_step": 5}, "at_step": 1}, "ramp="),
    ],
)
def test_bad_timing_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        MagnitudePruning(sparsity=0.5, **kwargs)


def test_n_m_patterns_do_not_ramp():
    with pytest.raises(PPQConfigError, match="N:M"):
        MagnitudePruning(pattern="2:4", ramp={"end_step": 4})


@pytest.mark.parametrize(
    ("stage", "limits", "match"),
    [
        (MagnitudePruning(sparsity=0.5, at_epoch=3), {"max_epochs": 3}, "below max_epochs=3"),
        (MagnitudePruning(sparsity=0.5, at_step=5), {"max_steps": 5}, "below max_steps=5"),
        (MagnitudePruning(sparsity=0.5, ramp={"end_step": 8}), {"max_steps": 8}, "max_steps=8"),
    ],
)
def test_timing_beyond_the_run_is_refused_before_anything_changes(tmp_path, stage, limits, match):
    model = module()
    weights = model.get_submodule(LAYER).weight.detach().clone()
    with pytest.raises(PPQConfigError, match=match):
        make_trainer(tmp_path, [stage], **limits).fit(model, train_dataloaders=loader())
    assert torch.equal(model.get_submodule(LAYER).weight, weights)
