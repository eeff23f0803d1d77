import torch
from torch import nn

from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.edits.blocks import (
    BLOCK_REMOVAL,
    remove_and_record,
    remove_blocks,
    replay_block_removal,
)
from ppq_lightning.edits.loading import enable_state_loading
from tests.helpers import TINY_LLAMA, tiny_causal_lm, token_batches

ENTRY = {"stage": "BlockRemoval", "method": "BlockRemoval", "kind": "P", "n_blocks": 2}


def _linear_weights(block: nn.Module) -> int:
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))


def test_remove_blocks_shrinks_the_container_and_the_config():
    model = tiny_causal_lm(TINY_LLAMA, 4)
    blocks = list(model.model.layers)
    removed = remove_blocks(model, "model.layers", [1, 2])
    assert isinstance(model.model.layers, nn.ModuleList)
    assert all(a is b for a, b in zip(model.model.layers, [blocks[0], blocks[3]], strict=True))
    assert model.config.num_hidden_layers == 2
    assert removed == _linear_weights(blocks[1]) + _linear_weights(blocks[2])
    assert removed == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)


def test_remove_blocks_renumbers_the_attention_layer_idx():
    model = tiny_causal_lm(TINY_LLAMA, 4)
    remove_blocks(model, "model.layers", [0, 2])
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]


def test_the_shrunk_model_still_runs_with_a_cache():
    model = tiny_causal_lm(TINY_LLAMA, 3).eval()
    remove_blocks(model, "model.layers", [1])
    tokens = token_batches(1)[0]
    with torch.no_grad():
        out = model(tokens, use_cache=True)
    assert out.logits.shape == (2, 16, 384)


def test_remove_blocks_does_not_count_a_layer_shared_with_a_kept_block():
    model = tiny_causal_lm(TINY_LLAMA, 3)
    layers = model.model.layers
    layers[1].mlp.down_proj = layers[0].mlp.down_proj  # block 1 shares block 0's down_proj
    full = _linear_weights(layers[1])
    removed = remove_blocks(model, "model.layers", [1])
    assert removed == full - 64 * 128


def test_remove_blocks_counts_the_recorded_original_weights():
    model = tiny_causal_lm(TINY_LLAMA, 3)
    q_proj = model.model.layers[2].self_attn.q_proj
    record_stage(
        q_proj, {"stage": "S", "method": "BasisSharing", "kind": "S", "original_weights": 7}
    )
    full = _linear_weights(model.model.layers[2])
    assert remove_blocks(model, "model.layers", [2]) == full - 64 * 64 + 7


def test_remove_and_record_records_on_the_container_parent():
    model = tiny_causal_lm(TINY_LLAMA, 4)
    weights = _linear_weights(model.model.layers[0]) + _linear_weights(model.model.layers[3])
    record = remove_and_record(model, "model.layers", [0, 3], ENTRY)
    assert record == {
        **ENTRY,
        "edit": BLOCK_REMOVAL,
        "container": "layers",
        "removed": [0, 3],
        "removed_weights": weights,
        "depth_config": {"num_hidden_layers": 4},
    }
    assert model.config.num_hidden_layers == 2  # the record keeps the depth before the removal
    assert get_state(model.model).history == [record]
    assert get_state(model) is None and get_state(model.model.layers) is None
    assert len(model.model.layers) == 2


def test_replay_block_removal_drops_the_same_blocks_of_a_fresh_model():
    source = tiny_causal_lm(TINY_LLAMA, 4)
    record = remove_and_record(source, "model.layers", [1, 2], ENTRY)
    fresh = tiny_causal_lm(TINY_LLAMA, 4)  # same seed: the same weights
    replay_block_removal(fresh, "model", record)
    assert len(fresh.model.layers) == 2 and fresh.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in fresh.model.layers] == [0, 1]
    for kept, original in zip(fresh.model.layers, source.model.layers, strict=True):
        assert torch.equal(kept.mlp.down_proj.weight, original.mlp.down_proj.weight)


def test_a_block_removed_state_dict_loads_strictly_into_a_fresh_model():
    source = tiny_causal_lm(TINY_LLAMA, 4)
    remove_and_record(source, "model.layers", [0, 2], ENTRY)
    fresh = tiny_causal_lm(TINY_LLAMA, 4)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # so that only the loading makes the models agree
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict
    assert len(fresh.model.layers) == 2
    assert get_state(fresh.model).history == get_state(source.model).history
    tokens = token_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, source(tokens).logits)


class _Blocks(nn.Module):
    def __init__(self, sequential: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(4, 4) for _ in range(3)]
        self.blocks = nn.Sequential(*layers) if sequential else nn.ModuleList(layers)


def test_remove_blocks_keeps_an_nn_sequential_container():
    model = _Blocks(sequential=True)
    first, last = model.blocks[0], model.blocks[2]
    assert remove_blocks(model, "blocks", [1]) == 16
    assert isinstance(model.blocks, nn.Sequential)
    assert model.blocks[0] is first and model.blocks[1] is last


def test_replay_block_removal_on_a_container_of_the_root():
    source = _Blocks()
    record = remove_and_record(source, "blocks", [1], ENTRY)
    assert get_state(source).history == [record] and record["container"] == "blocks"
    fresh = _Blocks()
    replay_block_removal(fresh, "", record)
    assert len(fresh.blocks) == 2
    assert torch.equal(fresh.blocks[1].weight, source.blocks[1].weight)


def test_a_state_dict_with_blocks_removed_from_a_root_container_loads():
    source = _Blocks()
    remove_and_record(source, "blocks", [1], ENTRY)
    fresh = _Blocks()
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())
    assert len(fresh.blocks) == 2
