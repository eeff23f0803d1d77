"""Shared test helpers: tiny model configs, token batches and a quiet CPU Trainer."""

import lightning as L
import torch
from torch import nn

from ppq_lightning.models.loading import load_causal_lm

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# width-32 OPT and GPT-2 (other families than Llama), with the name of their block container
TINY_OPT = (
    {
        "model_type": "opt",
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 32,
    },
    "model.decoder.layers",
)
TINY_GPT2 = (
    {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0},
    "transformer.h",
)


def tiny_causal_lm(config: dict, layers: int) -> nn.Module:
    """A HF causal LM built from ``config`` with ``layers`` blocks and a 384-token vocabulary."""
    depth_field = "n_layer" if config["model_type"] == "gpt2" else "num_hidden_layers"
    return load_causal_lm(config={**config, "vocab_size": 384, depth_field: layers}, seed=0)


# tiny models of the decoder families the engine supports, with their block containers
TINY_FAMILIES = {
    "llama": (
        {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "model.layers",
    ),
    "mistral": (
        {
            "model_type": "mistral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
        },
        "model.layers",
    ),
    "qwen2": (
        {
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "model.layers",
    ),
    "opt": TINY_OPT,
    "gpt2": TINY_GPT2,
}


def tiny_family(family: str, layers: int = 3) -> nn.Module:
    """A tiny HF causal LM of ``family`` (a key of :data:`TINY_FAMILIES`)."""
    return tiny_causal_lm(TINY_FAMILIES[family][0], layers)


def token_batches(n: int = 3) -> list[torch.Tensor]:
    """``n`` random batches of 2 x 16 token ids (seeded)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 384, (2, 16), generator=generator) for _ in range(n)]


def make_trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    """A real CPU Trainer that writes nothing outside ``tmp_path``."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def plain_llama(seed: int = 0, layers: int = 3) -> nn.Module:
    """A tiny HF ``LlamaForCausalLM`` built directly from ``LlamaConfig`` (vocabulary 128), as a
    user builds one, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def state_copy(module: nn.Module) -> dict:
    """A copy of ``module``'s state dict (tensors cloned, extra states as they are)."""
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in module.state_dict().items()
    }


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts hold the same keys, and each entry is equal bit for bit (dtype too)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def float_copy_sizes(monkeypatch) -> list[int]:
    """Record the number of entries of every ``Tensor.float()`` copy made from now on (the
    float32 temporaries of a method that should work a slice of rows at a time)."""
    sizes: list[int] = []
    original = torch.Tensor.float

    def watched(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", watched)
    return sizes
