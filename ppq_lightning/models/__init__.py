"""Models: loading causal LMs and tokenizers (HF ids, local folders, configs, the offline
SmolLM2 GGUF) and image classifiers (timm, torchvision, local weights, shipped models), and the
LightningModules that evaluate them (perplexity, lm-eval-harness task metrics, accuracy)."""

from ppq_lightning.models.causal_lm import CausalLMModule
from ppq_lightning.models.image_classifier import ImageClassifierModule
from ppq_lightning.models.lm_tasks import TaskEvaluation
from ppq_lightning.models.loading import (
    BYTE_TOKENIZER,
    OFFLINE_DEFAULT,
    load_causal_lm,
    load_tokenizer,
    smollm2_gguf_path,
)
from ppq_lightning.models.vision import load_image_classifier

__all__ = [
    "BYTE_TOKENIZER",
    "OFFLINE_DEFAULT",
    "CausalLMModule",
    "ImageClassifierModule",
    "TaskEvaluation",
    "load_causal_lm",
    "load_image_classifier",
    "load_tokenizer",
    "smollm2_gguf_path",
]
