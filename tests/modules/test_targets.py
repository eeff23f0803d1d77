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
    assert list(resolve_targets(model, targets="lm_head")) == ["lm_head"]  # explicit wins


def test_targets_matching_nothing_is_a_clear_error():
    with pytest.raises(PPQConfigError, match=r"targets='q_proj'.*matched no nn.Linear"):
        resolve_targets(Tiny(), targets="q_proj")


def test_invalid_regex():
    with pytest.raises(PPQConfigError, match="ignore"):
        resolve_targets(Tiny(), ignore="(")
