import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.calibration.blocks import without_blocks
from ppq_lightning.calibration.capture import no_cache
from ppq_lightning.calibration.scoring import candidate_losses, causal_lm_loss
from ppq_lightning.callbacks import BlockRemoval
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.helpers import (
    TINY_GPT2,
    TINY_LLAMA,
    TINY_OPT,
    make_trainer,
    tiny_causal_lm,
    token_batches,
)

FOUR_LAYERS = {**TINY_LLAMA, "num_hidden_layers": 4}


def test_removes_the_block_whose_loss_increase_is_smallest(tmp_path, tiny_data):
    module = CausalLMModule(model_config=FOUR_LAYERS, seed=0)
    batches = list(tiny_data.calibration_dataloader())
    with torch.no_grad():
        expected = {}
        for i in range(4):
            with without_blocks(module, "model.model.layers", {i}):
                expected[i] = causal_lm_loss(module, batches)
    assert len(module.model.model.layers) == 4  # restored
    stage = BlockRemoval(n_blocks=1, num_calibration_batches=len(batches))
    make_trainer(tmp_path, [stage]).validate(module, datamodule=tiny_data, verbose=False)
    layers = stage.result.layers["model.model.layers"]
    assert layers["removed_0"] == min(expected, key=expected.get)
    assert len(module.model.model.layers) == 3
    assert module.model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in module.model.model.layers] == [0, 1, 2]
    summary = stage.result.summary
    assert summary.measured_C == pytest.approx(4 / 3, rel=1e-6)
    assert summary.nominal_C == pytest.approx(4 / 3, rel=1e-6)
    assert check_invariants(module) == 0  # the record on the container has no weight to check


def test_checkpoint_of_a_shallower_model_loads_into_a_fresh_one(tmp_path, tiny_data):
    module = CausalLMModule(model_config=FOUR_LAYERS, seed=0)
    trainer = make_trainer(tmp_path, [BlockRemoval(ratio=0.5)])
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    ckpt = tmp_path / "sleb.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = module.evaluate(tiny_data.val_dataloader())["ppl"]

    fresh = CausalLMModule(model_config=FOUR_LAYERS, seed=5)
    again = BlockRemoval(ratio=0.5)
    make_trainer(tmp_path, [again]).validate(
        fresh, datamodule=tiny_data, ckpt_path=ckpt, verbose=False
    )
    assert again.result is None and len(fresh.model.model.layers) == 2
    assert fresh.evaluate(tiny_data.val_dataloader())["ppl"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give exactly one"),
        ({"n_blocks": 1, "ratio": 0.5}, "give exactly one"),
        ({"n_blocks": 0}, "n_blocks=0"),
        ({"ratio": 1.0}, "ratio=1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        BlockRemoval(**kwargs)


def test_cannot_remove_every_block(tiny_lm, tiny_data):
    with pytest.raises(PPQConfigError, match=r"n_blocks=2 .*from 1 to 1 \(the model has 2"):
        BlockRemoval(n_blocks=2).apply(tiny_lm, dataloader=tiny_data.calibration_dataloader())
    assert len(tiny_lm.model.model.layers) == 2


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
                losses[candidate] = causal_lm_loss(model, batches)
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
    stage = BlockRemoval(n_blocks=n_blocks, num_calibration_batches=len(batches))
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

    result = stage.apply(model, dataloader=batches)
    assert [result.layers[name][f"removed_{i}"] for i in range(n_blocks)] == expected_removed
    assert len(model.get_submodule(name)) == depth - n_blocks


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
        BlockRemoval(n_blocks=2).apply(model, dataloader=batches)
    handle.remove()
    assert model.get_submodule(name) is container and list(container) == blocks
    assert model.config.to_dict() == config
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
