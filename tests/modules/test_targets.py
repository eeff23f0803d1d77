import pytest
from torch import nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(8, 8), nn.Conv2d(2, 2, 1)) for _ in range(2)]
        )
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in many LLMs

    def get_output_embeddings(self):
        return self.lm_head


def test_default_skips_embeddings_and_head():
    assert list(resolve_targets(Tiny())) == ["blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"]


def test_targets_and_ignore_regexes():
    model = Tiny()
    assert list(resolve_targets(model, targets=r"blocks\.\d+\.0")) == ["blocks.0.0", "blocks.1.0"]
    assert list(resolve_targets(model, ignore=["blocks.1", r"\.1$"])) == ["blocks.0.0"]
    untied = Tiny()
    untied.lm_head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    assert list(resolve_targets(untied, targets="lm_head")) == ["lm_head"]  # explicit wins


def test_a_head_tied_to_the_embedding_is_refused():
    with pytest.raises(PPQConfigError, match=r"targets='lm_head' selects lm_head.*tied to embed"):
        resolve_targets(Tiny(), targets="lm_head")
    with pytest.raises(PPQConfigError, match=r"Untie them first.*or leave lm_head out"):
        resolve_targets(Tiny(), targets=["lm_head", "blocks"])


def test_layers_sharing_one_weight_are_refused_together_or_apart():
    # chosen together, a stage compresses the tensor twice (two Hessians under GPTQ, two bit
    # widths under mixed precision) and it ends off one of the two recorded grids (#27)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(PPQConfigError, match="selects 0 and 1, which hold the same weight"):
        resolve_targets(model)
    with pytest.raises(PPQConfigError, match="selects 1, whose weight is tied to 0"):
        resolve_targets(model, targets="1")


def test_default_targets_of_a_tied_llama_leave_the_head_out():
    from ppq_lightning.models.loading import load_causal_lm
    from tests.helpers import TINY_LLAMA

    model = load_causal_lm(config={**TINY_LLAMA, "tie_word_embeddings": True})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    chosen = resolve_targets(model)
    assert len(chosen) == 14 and not any("lm_head" in name for name in chosen)
    with pytest.raises(
        PPQConfigError, match=r"selects lm_head, whose weight is tied to model\.embed_tokens"
    ):
        resolve_targets(model, targets="lm_head")


def test_targets_matching_nothing_is_a_clear_error():
    with pytest.raises(PPQConfigError, match=r"targets='q_proj'.*matched no nn.Linear"):
        resolve_targets(Tiny(), targets="q_proj")


def test_invalid_regex():
    with pytest.raises(PPQConfigError, match="ignore"):
        resolve_targets(Tiny(), ignore="(")
