"""Models: loading causal LMs and tokenizers (HF ids, local folders, configs, the offline
SmolLM2 GGUF) and the LightningModule that evaluates them by perplexity."""

from ppq_lightning.models.causal_lm import CausalLMModule
from ppq_lightning.models.loading import (
    BYTE_TOKENIZER,
    OFFLINE_DEFAULT,
    load_causal_lm,
    load_tokenizer,
    smollm2_gguf_path,
)

__all__ = [
    "BYTE_TOKENIZER",
    "OFFLINE_DEFAULT",
    "CausalLMModule",
    "load_causal_lm",
    "load_tokenizer",
    "smollm2_gguf_path",
]
