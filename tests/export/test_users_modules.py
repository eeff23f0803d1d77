"""Exports of users' own LightningModules: the transformers model inside a plain module ships
in the formats of transformers models; a format that cannot hold the model says which format
refuses it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ppq_lightning import PPQConfigError
from ppq_lightning.callbacks import GPTQ, LoRAFineTune
from ppq_lightning.export import export, load_pretrained
from tests.user_modules import modules


def quiet_trainer(stage, **kwargs) -> L.Trainer:
    return L.Trainer(
        callbacks=[stage],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_an_hf_model_inside_a_users_module_exports_to_compressed_tensors(tmp_path):
    """It was refused: "exports transformers models, not UserCausalLM"."""
    module = modules.UserCausalLM()
    quiet_trainer(GPTQ(bits=4, num_calibration_batches=2)).validate(
        module, modules.token_dicts(), verbose=False
    )
    export(module, "compressed-tensors", tmp_path / "ct")
    loaded = load_pretrained(tmp_path / "ct")
    ids = next(iter(modules.token_dicts()))["input_ids"]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits)


def test_peft_names_itself_when_it_refuses_a_model(tmp_path):
    """A user's ResNet with adapters is refused by format='peft' with a message about peft (it
    named compressed-tensors), before anything is written."""
    module = modules.UserClassifier("timm_resnet10t")
    quiet_trainer(LoRAFineTune(r=2), max_steps=1).fit(module, modules.images())
    with pytest.raises(PPQConfigError, match=r"format='peft' exports a transformers base"):
        export(module, "peft", tmp_path / "p")
    assert not (tmp_path / "p").exists()
