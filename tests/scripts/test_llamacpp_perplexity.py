"""scripts/llamacpp_perplexity.py: its scoring is llama-perplexity's, and without a build it
skips with the reason, writing what it skipped."""

import json
import math
from types import SimpleNamespace

import torch

from tests.scripts.helpers import load_script


class _Uniform(torch.nn.Module):
    """A causal LM whose logits favour token ``(t + 1) % vocab`` after ``t`` by ``margin``."""

    def __init__(self, vocab: int = 8, margin: float = 2.0) -> None:
        super().__init__()
        self.vocab, self.margin = vocab, margin

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*ids.shape, self.vocab)
        logits.scatter_(-1, ((ids + 1) % self.vocab)[..., None], self.margin)
        return SimpleNamespace(logits=logits)


def test_only_the_second_half_of_each_chunk_is_scored_with_bos_first():
    script = load_script("llamacpp_perplexity")
    model = _Uniform()
    ids = torch.arange(40) % 8  # every next token is the favoured one ...
    ids[5] = 3  # ... except in the first half of the first chunk (not scored)
    p_hit = math.exp(2.0) / (math.exp(2.0) + 7)
    ppl = script.ours_like_llama_cpp(model, ids, ctx=16, bos=None)
    assert math.isclose(ppl, 1 / p_hit, rel_tol=1e-5)  # 2 whole chunks, the tail dropped
    ids[12] = 0  # now a miss in a scored position of chunk 0 (predicting token 12)
    worse = script.ours_like_llama_cpp(model, ids, ctx=16, bos=None)
    assert worse > ppl
    # BOS replaces the first token of a chunk: it only changes the logits of position 0,
    # which is never scored
    assert script.ours_like_llama_cpp(model, ids, ctx=16, bos=7) == worse


def test_without_a_build_it_skips_and_says_why(tmp_path, monkeypatch):
    script = load_script("llamacpp_perplexity")
    monkeypatch.setattr(script.shutil, "which", lambda tool: None)
    summary = script.main([f"--output={tmp_path / 'out'}", f"--build-dir={tmp_path / 'b'}"])
    assert summary["skipped"] == "cmake is not installed"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"]
    assert "Skipped: cmake is not installed" in (tmp_path / "out" / "README.md").read_text()
    assert not (tmp_path / "b").exists()  # nothing downloaded or built


def test_chunks_limits_the_scored_chunks_to_llama_cpps_count():
    script = load_script("llamacpp_perplexity")
    ids = torch.arange(48) % 8
    ids[41] = 0  # a miss in the scored half of the third chunk only
    model = _Uniform()
    assert script.ours_like_llama_cpp(model, ids, ctx=16, bos=None, chunks=2) < (
        script.ours_like_llama_cpp(model, ids, ctx=16, bos=None)
    )
