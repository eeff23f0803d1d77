import pytest
import torch

import ppq_lightning
from ppq_lightning.callbacks import LoRAFineTune, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.export.fresh import fresh_logits
from tests.export.helpers import compressed_lm
from tests.helpers import TINY_LLAMA, make_trainer, token_batches


def test_base_and_adapters_load_with_peft_in_a_fresh_process(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [RTNQuantization(bits=4, group_size=32, name="Q"), LoRAFineTune(r=2, name="L")]
    make_trainer(tmp_path, stages, max_steps=3, limit_val_batches=0).fit(
        module, datamodule=tiny_data
    )
    manifest = ppq_lightning.export(module, "peft", tmp_path / "out")
    assert manifest["adapters"]["layers"] == 14
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    ids = token_batches(1)[0]
    got, errors = fresh_logits(tmp_path, {"peft": (tmp_path / "out", "peft")}, ids)
    assert not errors
    assert torch.allclose(got["peft"], module.eval()(ids), atol=1e-5)


def test_peft_needs_adapters(tmp_path):
    with pytest.raises(PPQConfigError, match="needs unmerged LoRA adapters"):
        ppq_lightning.export(compressed_lm(RTNQuantization(bits=4)), "peft", tmp_path / "out")


def test_merged_adapters_export_as_a_plain_compressed_model(tmp_path, tiny_data):
    from ppq_lightning.export import load_pretrained

    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [RTNQuantization(bits=4, name="Q"), LoRAFineTune(r=2, name="L", merge="at_end")]
    trainer = make_trainer(tmp_path, stages, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_data)
    with pytest.raises(PPQConfigError, match="needs unmerged LoRA adapters"):
        ppq_lightning.export(module, "peft", tmp_path / "peft")
    ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct")
    ids = token_batches(1)[0]
    assert torch.equal(load_pretrained(tmp_path / "ct")(ids).logits, module.eval()(ids))
