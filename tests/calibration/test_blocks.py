"""Repeated blocks (ppq_lightning.calibration.blocks): finding them in tiny HF models and plain
modules, and running a model without some of them while its configs follow."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ppq_lightning.calibration.blocks import (
    feeds_directly,
    find_block_chain,
    find_blocks,
    renumber_blocks,
    set_depth,
    subset_blocks,
    without_blocks,
)
from tests.helpers import TINY_GPT2, TINY_LLAMA, TINY_OPT, tiny_causal_lm, token_batches

TINY_QWEN2 = {  # a family whose config has layer_types
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


class FakeConfig:
    """The parts of a HF config that the depth bookkeeping reads."""

    def __init__(self, depth: int, layer_types: list[str] | None = None) -> None:
        self.num_hidden_layers = depth
        self.layer_types = layer_types

    def to_dict(self) -> dict:
        return dict(vars(self))


class Block(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc.layer_idx = index
        self.index = index

    def forward(self, x):
        return x + self.fc(x)


class Stack(nn.Module):
    """A stem, three blocks and a head; the blocks are the only repeated container."""

    def __init__(self, container=nn.ModuleList) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        blocks = [Block(i) for i in range(3)]
        self.blocks = container(blocks) if container is nn.ModuleList else container(*blocks)
        self.head = nn.Linear(4, 2)
        self.config = FakeConfig(3, ["a", "b", "c"])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize(
    ("config", "name"),
    [(TINY_LLAMA, "model.layers"), (TINY_OPT[0], TINY_OPT[1]), (TINY_GPT2[0], TINY_GPT2[1])],
    ids=["llama", "opt", "gpt2"],
)
def test_find_blocks_in_tiny_hf_models(config, name):
    model = tiny_causal_lm(config, 2)
    found = find_blocks(model)
    assert found is not None
    assert found[0] == name and found[1] is model.get_submodule(name)
    assert len(found[1]) == 2


@pytest.mark.parametrize("container", [nn.ModuleList, nn.Sequential])
def test_find_blocks_in_a_plain_module(container):
    model = Stack(container)
    assert find_blocks(model) == ("blocks", model.blocks)


def test_find_blocks_in_a_generic_sequential_picks_the_largest_repeated_container():
    small = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    big = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
    model = nn.Sequential(small, nn.ReLU(), big)
    assert find_blocks(model) == ("2", big)


def test_find_blocks_is_none_without_repeated_blocks():
    assert find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) is None
    # one block only, or repeated blocks without parameters, are not blocks
    assert find_blocks(nn.Sequential(nn.ModuleList([nn.Linear(4, 4)]), nn.Linear(4, 2))) is None
    assert find_blocks(nn.ModuleList([nn.ReLU(), nn.ReLU()])) is None


def test_without_blocks_drops_blocks_and_the_config_follows_then_restores():
    model = Stack()
    original = model.blocks
    with without_blocks(model, "blocks", {1}):
        assert [block.index for block in model.blocks] == [0, 2]
        assert isinstance(model.blocks, nn.ModuleList)
        assert model.config.num_hidden_layers == 2
        assert model.config.layer_types == ["a", "c"]
        assert model(torch.zeros(1, 4)).shape == (1, 2)
    assert model.blocks is original
    assert model.config.num_hidden_layers == 3
    assert model.config.layer_types == ["a", "b", "c"]


def test_without_blocks_restores_everything_when_the_body_raises():
    model = Stack(nn.Sequential)
    original = model.blocks
    with pytest.raises(RuntimeError, match="inside"), without_blocks(model, "blocks", {0, 2}):
        assert [block.index for block in model.blocks] == [1]
        assert model.config.num_hidden_layers == 1
        raise RuntimeError("inside")
    assert model.blocks is original
    assert (model.config.num_hidden_layers, model.config.layer_types) == (3, ["a", "b", "c"])


def test_without_blocks_runs_stand_ins_for_replaced_blocks():
    model = Stack()
    stand_in = Block(9)
    with without_blocks(model, "blocks", {0}, replace={2: stand_in}):
        assert list(model.blocks) == [model.blocks[0], stand_in]
        assert model.blocks[0].index == 1
        assert model.config.layer_types == ["b", "c"]  # the stand-in keeps block 2's entry
    assert [block.index for block in model.blocks] == [0, 1, 2]


def test_without_blocks_nests():
    model = Stack()
    with without_blocks(model, "blocks", {0}):
        with without_blocks(model, "blocks", {0}):  # index 0 of the enclosing [1, 2]
            assert [block.index for block in model.blocks] == [2]
            assert model.config.num_hidden_layers == 1
            assert model.config.layer_types == ["c"]
        assert [block.index for block in model.blocks] == [1, 2]
        assert (model.config.num_hidden_layers, model.config.layer_types) == (2, ["b", "c"])
    assert (model.config.num_hidden_layers, model.config.layer_types) == (3, ["a", "b", "c"])


def test_without_blocks_on_a_tiny_hf_model_follows_num_hidden_layers_and_layer_types():
    model = tiny_causal_lm(TINY_QWEN2, 3)
    layers, types = model.model.layers, list(model.config.layer_types)
    assert len(types) == 3
    ids = token_batches(1)[0]
    with without_blocks(model, "model.layers", {1}):
        assert len(model.model.layers) == 2
        assert model.config.num_hidden_layers == 2
        assert model.config.layer_types == [types[0], types[2]]
        logits = model(input_ids=ids, use_cache=False).logits
        assert logits.shape == (*ids.shape, 384) and torch.isfinite(logits).all()
    assert model.model.layers is layers
    assert model.config.num_hidden_layers == 3 and model.config.layer_types == types


@pytest.mark.parametrize("container", [nn.ModuleList, nn.Sequential])
def test_subset_blocks_keeps_the_kind_of_container_and_the_blocks_themselves(container):
    blocks = Stack(container).blocks
    subset = subset_blocks(blocks, [2, 0])
    assert type(subset) is container
    assert list(subset) == [blocks[2], blocks[0]]
    assert len(blocks) == 3  # the original container is unchanged


def test_subset_blocks_with_replace():
    blocks = Stack().blocks
    stand_in = nn.Identity()
    subset = subset_blocks(blocks, [0, 1], replace={1: stand_in, 2: nn.ReLU()})
    assert list(subset) == [blocks[0], stand_in]


def test_set_depth_changes_the_depth_fields_equal_to_the_old_depth():
    config = FakeConfig(4, ["a", "b", "c", "d"])
    config.n_layer, config.num_layers = 4, 7  # num_layers counts something else
    model = nn.Linear(2, 2)
    model.config = config
    set_depth(model, 4, [0, 3])
    assert (config.num_hidden_layers, config.n_layer, config.num_layers) == (2, 2, 7)
    assert config.layer_types == ["a", "d"]


def test_set_depth_leaves_layer_types_of_another_length_alone():
    model = nn.Linear(2, 2)
    model.config = FakeConfig(3, ["x", "y"])
    set_depth(model, 3, [1])
    assert model.config.num_hidden_layers == 1 and model.config.layer_types == ["x", "y"]


def test_set_depth_changes_a_config_shared_by_several_modules_once():
    config = FakeConfig(3, ["a", "b", "c"])
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].config = model[1].config = model.config = config
    set_depth(model, 3, [0, 2])
    assert (config.num_hidden_layers, config.layer_types) == (2, ["a", "c"])


def test_set_depth_on_a_tiny_gpt2_uses_n_layer():
    model = tiny_causal_lm(TINY_GPT2[0], 3)
    set_depth(model, 3, [0, 2])
    assert model.config.n_layer == 2


def test_renumber_blocks_gives_layer_idx_the_new_positions():
    blocks = subset_blocks(Stack().blocks, [2, 0])
    untouched = nn.Linear(1, 1)
    untouched.layer_idx = None  # not an int: left alone
    blocks[0].add_module("extra", untouched)
    renumber_blocks(blocks)
    assert [block.fc.layer_idx for block in blocks] == [0, 1]
    assert untouched.layer_idx is None


def test_renumber_blocks_of_a_tiny_llama():
    model = tiny_causal_lm(TINY_LLAMA, 3)
    blocks = subset_blocks(model.model.layers, [1, 2])
    renumber_blocks(blocks)
    assert [block.self_attn.layer_idx for block in blocks] == [0, 1]


class _Stage(nn.Sequential):
    def forward(self, x):  # not pure composition
        return super().forward(x) * 2


def test_feeds_directly_only_through_plain_sequentials():
    import torchvision

    model = nn.Sequential(
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
        _Stage(nn.Linear(2, 2), nn.Linear(2, 2)),
    )
    assert feeds_directly(model, "0.0", "0.1")
    assert feeds_directly(model, "0.1", "1.0")  # last of a stage -> first of the next
    assert not feeds_directly(model, "0.0", "1.0")  # 0.1 runs between them
    assert not feeds_directly(model, "0.1", "1.1")
    assert not feeds_directly(model, "1.1", "2.0")  # into a stage with its own forward
    assert not feeds_directly(model, "2.0", "2.1")
    assert not feeds_directly(model, "0", "0.1")  # one holds the other
    resnet = torchvision.models.resnet18()
    assert feeds_directly(resnet, "layer1.0", "layer1.1")
    assert not feeds_directly(resnet, "layer1.1", "layer2.0")  # ResNet.forward calls them
    llama = tiny_causal_lm(TINY_LLAMA, 2)
    assert not feeds_directly(llama, "model.layers.0", "model.layers.1")  # a ModuleList


def test_block_chain_of_named_children_uses_their_names():
    """torchvision's ViT: ``encoder.layers`` is an ``nn.Sequential(OrderedDict(...))`` whose
    blocks are ``encoder_layer_0``...; the chain named them ``encoder.layers.0``, so the
    calibration engine found none of their layers in a block and ran them all model-wide."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    chain = find_block_chain(model)
    names = tuple(f"encoder.layers.encoder_layer_{i}" for i in range(3))
    assert chain is not None and chain.names == names
    assert all(model.get_submodule(n) is b for n, b in zip(chain.names, chain.blocks, strict=True))
    assert chain.index_of("encoder.layers.encoder_layer_2.mlp.3") == 2
    assert find_blocks(model) == ("encoder.layers", model.encoder.layers)


def test_subset_blocks_keeps_the_names_of_named_blocks():
    named = nn.Sequential(OrderedDict((f"layer_{i}", nn.Linear(4, 4)) for i in range(4)))
    subset = subset_blocks(named, [0, 2, 3], {2: nn.Identity()})
    assert [n for n, _ in subset.named_children()] == ["layer_0", "layer_2", "layer_3"]
    assert subset[0] is named[0] and isinstance(subset[1], nn.Identity) and subset[2] is named[3]
    positional = subset_blocks(nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]), [0, 2])
    assert [n for n, _ in positional.named_children()] == ["0", "1"]  # renumbered as before
