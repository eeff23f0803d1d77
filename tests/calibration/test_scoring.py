"""Block scoring (SLEB): the shared-prefix candidate losses equal one whole-model forward per
candidate, and the model is left as it was whatever happens."""

import pytest
import torch
from torch import nn

from ppq_lightning import PPQConfigError
from ppq_lightning.calibration.blocks import without_blocks
from ppq_lightning.calibration.capture import no_cache
from ppq_lightning.calibration.scoring import (
    calibration_loss,
    candidate_losses,
    greedy_block_removal,
)
from tests.helpers import TINY_GPT2, TINY_LLAMA, TINY_OPT, tiny_causal_lm, token_batches

ARCHS = {
    "llama": ({**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 64}, "model.layers"),
    "opt": TINY_OPT,
    "gpt2": TINY_GPT2,
    # layer_types ["full", "sliding", "sliding", ...]: blocks get different attention masks
    "qwen2-sliding": (
        {
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 1,
        },
        "model.layers",
    ),
}


def _model(arch: str, layers: int) -> nn.Module:
    return tiny_causal_lm(ARCHS[arch][0], layers)


def _whole_model_losses(model, name, removed, batches) -> dict[int, float]:
    """The reference: one whole forward of the model per candidate."""
    losses = {}
    for candidate in range(len(model.get_submodule(name))):
        if candidate not in removed:
            # no KV cache: its layers are indexed by the blocks' original layer_idx
            with no_cache(model), without_blocks(model, name, {*removed, candidate}):
                losses[candidate] = calibration_loss(model, batches)
    return losses


def _count_block_forwards(blocks) -> tuple[list[int], list]:
    count = [0]
    handles = [
        b.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for b in blocks
    ]
    return count, handles


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("n_blocks", [2, 3])
def test_shared_prefix_search_equals_the_whole_model_search(arch, n_blocks):
    depth = 5
    model, name, batches = _model(arch, depth), ARCHS[arch][1], token_batches()
    blocks = list(model.get_submodule(name))
    config = model.config.to_dict()
    expected_removed = []
    with torch.no_grad():
        for _ in range(n_blocks):
            expected = _whole_model_losses(model, name, expected_removed, batches)
            count, handles = _count_block_forwards(blocks)
            got = candidate_losses(model, name, expected_removed, batches)
            for handle in handles:
                handle.remove()
            assert list(got) == list(expected)
            for candidate, loss in expected.items():
                assert got[candidate] == pytest.approx(loss, rel=1e-5, abs=0), candidate
            kept = depth - len(expected_removed)  # walk K - 1 blocks, candidate tails K(K-1)/2
            assert count[0] == len(batches) * (kept - 1) * (kept + 2) // 2
            expected_removed.append(min(expected, key=expected.get))
    assert model.config.to_dict() == config and list(model.get_submodule(name)) == blocks

    with torch.no_grad():
        removed, losses = greedy_block_removal(model, name, n_blocks, batches)
    assert removed == expected_removed and len(losses) == n_blocks
    assert list(model.get_submodule(name)) == blocks  # the search removes nothing itself


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-sliding"])
def test_model_is_restored_when_the_search_fails(arch):
    model, name, batches = _model(arch, 4), ARCHS[arch][1], token_batches()
    container = model.get_submodule(name)
    blocks = list(container)
    config = model.config.to_dict()
    calls = [0]

    def fail(*_):
        calls[0] += 1
        if calls[0] == 2 * len(batches) + 1:  # inside a candidate tail (replay in place)
            raise RuntimeError("boom")

    handle = blocks[-1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        greedy_block_removal(model, name, 2, batches)
    handle.remove()
    assert model.get_submodule(name) is container and list(container) == blocks
    assert model.config.to_dict() == config
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_classifier_is_scored_by_its_cross_entropy_against_the_labels():
    """A ViT-like classifier (logits ``(B, classes)``) is scored against the batch's labels
    (SLEB's next-token loss read its images as token ids: a raw dtype error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(4, 3, 4), torch.tensor([0, 1, 2, 3])
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert calibration_loss(model, [(x, y)]) == pytest.approx(expected)
    assert calibration_loss(model, [{"x": x, "labels": y}], lambda m, b: m(b["x"])) == (
        pytest.approx(expected)
    )
    with pytest.raises(PPQConfigError, match=r"holds no integer tensor of shape \(4,\)"):
        calibration_loss(model, [(x,)])
