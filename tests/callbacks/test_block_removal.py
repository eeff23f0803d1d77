import pytest
import torch

from ppq_lightning import check_invariants
from ppq_lightning.calibration.blocks import without_blocks
from ppq_lightning.calibration.scoring import calibration_loss
from ppq_lightning.callbacks import BlockRemoval
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.helpers import (
    TINY_LLAMA,
    make_trainer,
)

FOUR_LAYERS = {**TINY_LLAMA, "num_hidden_layers": 4}


def test_removes_the_block_whose_loss_increase_is_smallest(tmp_path, tiny_data):
    module = CausalLMModule(model_config=FOUR_LAYERS, seed=0)
    batches = list(tiny_data.calibration_dataloader())
    with torch.no_grad():
        expected = {}
        for i in range(4):
            with without_blocks(module, "model.model.layers", {i}):
                expected[i] = calibration_loss(module, batches)
    assert len(module.model.model.layers) == 4  # restored
    stage = BlockRemoval(n_blocks=1, num_calibration_batches=len(batches))
    make_trainer(tmp_path, [stage]).validate(module, datamodule=tiny_data, verbose=False)
    layers = stage.result.layers["model.model.layers"]
    assert layers["removed_0"] == min(expected, key=expected.get)
    assert len(module.model.model.layers) == 3
    assert module.model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in module.model.model.layers] == [0, 1, 2]
    summary = stage.result.summary
    assert summary.measured_C == pytest.approx(4 / 3, rel=1e-6)
    assert summary.nominal_C == pytest.approx(4 / 3, rel=1e-6)
    assert check_invariants(module) == 0  # the record on the container has no weight to check


def test_checkpoint_of_a_shallower_model_loads_into_a_fresh_one(tmp_path, tiny_data):
    module = CausalLMModule(model_config=FOUR_LAYERS, seed=0)
    trainer = make_trainer(tmp_path, [BlockRemoval(ratio=0.5)])
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    ckpt = tmp_path / "sleb.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = module.evaluate(tiny_data.val_dataloader())["ppl"]

    fresh = CausalLMModule(model_config=FOUR_LAYERS, seed=5)
    again = BlockRemoval(ratio=0.5)
    make_trainer(tmp_path, [again]).validate(
        fresh, datamodule=tiny_data, ckpt_path=ckpt, verbose=False
    )
    assert again.result is None and len(fresh.model.model.layers) == 2
    assert fresh.evaluate(tiny_data.val_dataloader())["ppl"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give exactly one"),
        ({"n_blocks": 1, "ratio": 0.5}, "give exactly one"),
        ({"n_blocks": 0}, "n_blocks=0"),
        ({"ratio": 1.0}, "ratio=1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        BlockRemoval(**kwargs)


def test_cannot_remove_every_block(tiny_lm, tiny_data):
    with pytest.raises(PPQConfigError, match=r"n_blocks=2 .*from 1 to 1 \(the model has 2"):
        BlockRemoval(n_blocks=2).apply(tiny_lm, dataloader=tiny_data.calibration_dataloader())
    assert len(tiny_lm.model.model.layers) == 2
