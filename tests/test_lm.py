import math

import pytest
import torch

from ppq_lightning.lm import CausalLMModule
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
