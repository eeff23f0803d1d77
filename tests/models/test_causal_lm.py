import math

import pytest
import torch

from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer


def test_validation_perplexity_is_exp_of_mean_token_nll(tmp_path, tiny_lm, tiny_data):
    result = make_trainer(tmp_path).validate(tiny_lm, datamodule=tiny_data, verbose=False)[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in tiny_data.val_dataloader():
            ids = batch["input_ids"]
            logits = tiny_lm.model(input_ids=ids).logits[:, :-1]
            nll += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
            ).item()
            count += ids[:, 1:].numel()
    assert result["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert tiny_lm.evaluate(tiny_data.val_dataloader())["ppl"] == pytest.approx(
        result["val/ppl"], rel=1e-5
    )
    assert 100 < result["val/ppl"] < 1000  # a random model with 384 tokens is near uniform


def test_test_loop_and_a_few_training_steps(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, learning_rate=1e-2)
    before = module.evaluate(tiny_data.val_dataloader())["ppl"]
    make_trainer(tmp_path, max_steps=10, limit_val_batches=0).fit(module, datamodule=tiny_data)
    assert module.evaluate(tiny_data.val_dataloader())["ppl"] < before
    result = make_trainer(tmp_path).test(module, datamodule=tiny_data, verbose=False)[0]
    assert math.isfinite(result["test/ppl"])


def test_from_model_wraps_a_built_model(tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA)
    wrapped = CausalLMModule.from_model(module.model)
    assert wrapped.evaluate(tiny_data.val_dataloader()) == module.evaluate(
        tiny_data.val_dataloader()
    )


def test_tensor_batches_loss_and_in_place_weight_changes(tmp_path, tiny_lm, tiny_data):
    windows = tiny_data.eval_windows
    tensors = torch.utils.data.DataLoader(windows, batch_size=3)  # batches of plain tensors
    result = make_trainer(tmp_path).validate(tiny_lm, dataloaders=tensors, verbose=False)[0]
    evaluated = tiny_lm.evaluate(tiny_data.val_dataloader())
    assert result["val/ppl"] == pytest.approx(evaluated["ppl"], rel=1e-5)
    assert result["val/loss"] == pytest.approx(math.log(result["val/ppl"]), rel=1e-4)
    assert evaluated["loss"] == pytest.approx(math.log(evaluated["ppl"]))
    with torch.no_grad():  # what a compression callback does: edit weights in place
        tiny_lm.model.model.layers[0].mlp.down_proj.weight.mul_(50.0)
    changed = tiny_lm.evaluate(tensors)["ppl"]
    assert changed != pytest.approx(evaluated["ppl"], rel=1e-3)
    result = make_trainer(tmp_path).validate(tiny_lm, dataloaders=tensors, verbose=False)[0]
    assert result["val/ppl"] == pytest.approx(changed, rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_training_step_and_evaluate_keep_the_mode(tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA).train()
    loss = module.training_step(next(iter(tiny_data.train_dataloader())), 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    module.evaluate(tiny_data.val_dataloader())
    assert module.training
    assert CausalLMModule.metric_name == "ppl" and CausalLMModule.higher_is_better is False


def test_bad_dtype_is_a_config_error():
    from ppq_lightning.errors import PPQConfigError

    with pytest.raises(PPQConfigError, match="dtype='int8'"):
        CausalLMModule(model_config=TINY_LLAMA, dtype="int8")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": "x"}, "seed='x' is not allowed: expected an integer >= 0"),
        ({"seed": 1.5}, "seed=1.5 is not allowed"),
        ({"learning_rate": "1e-4"}, "learning_rate='1e-4' is not allowed: expected a number > 0"),
        ({"model_config": "llama"}, "model_config='llama' is not allowed: expected None or a dict"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    from ppq_lightning.errors import PPQConfigError

    with pytest.raises(PPQConfigError, match=match):
        CausalLMModule(**{"model_config": TINY_LLAMA, **kwargs})
    with pytest.raises(PPQConfigError, match="model=None is not allowed"):
        CausalLMModule(model=None)
    with pytest.raises(PPQConfigError, match="learning_rate=0 is not allowed"):
        CausalLMModule.from_model(CausalLMModule(model_config=TINY_LLAMA).model, learning_rate=0)


def test_a_compressed_checkpoint_loads_and_a_plain_load_state_dict_says_how(tmp_path, tiny_data):
    from ppq_lightning import check_invariants
    from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
    from ppq_lightning.edits.loading import enable_state_loading
    from ppq_lightning.errors import PPQConfigError

    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    trainer = make_trainer(tmp_path, [MagnitudePruning(0.5), RTNQuantization(bits=4)])
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    trainer.save_checkpoint(tmp_path / "pq.ckpt")
    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=1)
    with pytest.raises(PPQConfigError, match=r"14 layer\(s\) .*enable_state_loading\(model\)"):
        fresh.load_state_dict(module.state_dict())
    with pytest.raises(PPQConfigError, match="enable_state_loading"):  # masks not dropped
        fresh.load_state_dict(module.state_dict(), strict=False)
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict())
    assert check_invariants(fresh) == 14
    loaded = CausalLMModule.load_from_checkpoint(tmp_path / "pq.ckpt")
    assert check_invariants(loaded) == 14
    for key, value in module.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, loaded.state_dict()[key]), key
