"""Compressed tiny models for the export tests."""

from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_FAMILIES, TINY_LLAMA, token_batches


def compressed_lm(*stages, family: str | None = None):
    """A tiny causal LM (TINY_LLAMA, or a TINY_FAMILIES entry) with ``stages`` applied."""
    config = TINY_LLAMA if family is None else {**TINY_FAMILIES[family][0], "vocab_size": 384}
    module = CausalLMModule(model_config=config, seed=0)
    for stage in stages:
        stage.apply(module, dataloader=token_batches(2))
    return module


def logits(module, ids):
    return module.model(ids).logits
