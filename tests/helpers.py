"""Shared test helpers: a tiny Llama config and a quiet CPU Trainer."""

import lightning as L

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
