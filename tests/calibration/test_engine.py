import weakref

import pytest
import torch
from torch import nn

from ppq_lightning.calibration.blocks import find_blocks
from ppq_lightning.calibration.capture import capture_block_inputs
from ppq_lightning.calibration.engine import calibrate_sequentially
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from tests.helpers import TINY_FAMILIES as ARCHS
from tests.helpers import tiny_causal_lm, token_batches
from tests.helpers import tiny_family as _model


def _forward(model, batch):
    return model(input_ids=batch, use_cache=False)


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


@pytest.mark.parametrize("arch", list(ARCHS))
def test_blocks_are_found(arch):
    name, blocks = find_blocks(_model(arch))
    assert name == ARCHS[arch][1] and len(blocks) == 3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_engine_statistics_equal_a_plain_forward(arch):
    """Block by block with captured kwargs gives the same layer inputs as the whole model."""
    model = _model(arch)
    targets = resolve_targets(model)
    assert len(targets) >= 12
    expected = {name: torch.zeros(0) for name in targets}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: expected.__setitem__(
                name, expected[name] + _gram(args[0]) if expected[name].numel() else _gram(args[0])
            )
        )
        for name, m in targets.items()
    ]
    with torch.no_grad():
        for batch in token_batches():
            _forward(model, batch)
    for h in hooks:
        h.remove()

    seen: dict[str, torch.Tensor] = {}
    compressed: list[str] = []

    def observe(name, layer, x):
        seen[name] = seen[name] + _gram(x) if name in seen else _gram(x)

    report = calibrate_sequentially(
        model,
        targets,
        token_batches(),
        observe,
        lambda layers: compressed.extend(layers),
        forward=_forward,
    )
    assert sorted(compressed) == sorted(targets)
    for name in targets:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-4, atol=1e-4)
    assert report.n_blocks == 3 and report.block_passes == 5  # 2 passes per block, 1 for the last
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _zero_first_half(layers):
    for layer in layers.values():
        w = weight_matrix(layer)
        w[:, : w.shape[1] // 2] = 0


def test_compressed_versus_original_calibration():
    grams = {}
    for source in ("compressed", "original"):
        model = _model("llama")
        targets = resolve_targets(model, targets=r"mlp\.down_proj")
        seen = {}
        report = calibrate_sequentially(
            model,
            targets,
            token_batches(),
            lambda n, m, x, seen=seen: seen.setdefault(n, _gram(x)),
            _zero_first_half,
            calibrate_on=source,
            forward=_forward,
        )
        grams[source] = seen
        assert report.block_passes == (5 if source == "compressed" else 3)
    first = "model.layers.0.mlp.down_proj"
    last = "model.layers.2.mlp.down_proj"
    torch.testing.assert_close(grams["compressed"][first], grams["original"][first])
    assert not torch.allclose(grams["compressed"][last], grams["original"][last])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


def test_generic_sequential_and_layers_outside_blocks():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Sequential(Block(), Block(), Block()), nn.Linear(8, 2)
    )
    targets = resolve_targets(model)
    order = []
    report = calibrate_sequentially(
        model,
        targets,
        [torch.randn(5, 4)],
        lambda *a: None,
        lambda layers: order.append(sorted(layers)),
    )
    assert order == [["1.0.fc"], ["1.1.fc"], ["1.2.fc"], ["0", "2"]]
    assert report.model_passes == 1


class CountingBlock(Block):
    """A block that counts how many of the outputs it made are still alive."""

    def __init__(self, alive: set[int], peak: list[int]):
        super().__init__()
        self.alive, self.peak = alive, peak

    def forward(self, x):
        y = super().forward(x)
        key = id(y)
        self.alive.add(key)
        weakref.finalize(y, self.alive.discard, key)
        self.peak[0] = max(self.peak[0], len(self.alive))
        return y


@pytest.mark.parametrize("calibrate_on", ["compressed", "original"])
def test_one_set_of_activations_is_held(calibrate_on):
    alive, peak, n = set(), [0], 4
    blocks = nn.Sequential(*(CountingBlock(alive, peak) for _ in range(4)))
    model = nn.Sequential(nn.Linear(4, 8), blocks, nn.Linear(8, 2))
    report = calibrate_sequentially(
        model,
        {f"1.{i}.fc": blocks[i].fc for i in range(4)},
        [torch.randn(5, 4) for _ in range(n)],
        lambda *a: None,
        lambda layers: None,
        calibrate_on=calibrate_on,
    )
    # every block's outputs replace its inputs one by one: n alive, plus the one being made
    assert peak[0] <= n + 1
    assert report.block_passes == (7 if calibrate_on == "compressed" else 4)


def test_keyword_arguments_equal_in_every_batch_are_stored_once():
    model = _model("llama", layers=2)
    inputs = capture_block_inputs(model, find_blocks(model)[1][0], token_batches(3), _forward)
    first, last = inputs.kwargs[0], inputs.kwargs[-1]
    assert first["position_embeddings"] is last["position_embeddings"]
    assert inputs.args[0][0] is not inputs.args[-1][0]


def test_hooks_are_removed_when_a_step_raises():
    model = _model("llama", layers=2)
    targets = resolve_targets(model)

    def fail(layers):
        raise RuntimeError("solver failed")

    with pytest.raises(RuntimeError, match="solver failed"):
        calibrate_sequentially(
            model, targets, token_batches(1), lambda *a: None, fail, forward=_forward
        )
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_nan_activations_name_the_layer():
    model = _model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(PPQConfigError, match=r"NaN or Inf .*(mlp|layers\.0)"):
        calibrate_sequentially(
            model,
            resolve_targets(model),
            token_batches(1),
            lambda *a: None,
            lambda layers: None,
            forward=_forward,
        )


def test_empty_calibration_and_bad_source():
    model = _model("llama", layers=2)
    with pytest.raises(PPQConfigError, match="calibration dataloader is empty"):
        calibrate_sequentially(
            model, resolve_targets(model), [], lambda *a: None, lambda layers: None
        )
    with pytest.raises(PPQConfigError, match="calibrate_on='dense'"):
        calibrate_sequentially(
            model,
            resolve_targets(model),
            token_batches(1),
            lambda *a: None,
            lambda layers: None,
            calibrate_on="dense",
        )


# -- every block with its own call arguments: the engine equals a plain forward, exactly --------
GEMMA3 = {  # mixed attention types: a sliding window (4) shorter than the sequence (16)
    "model_type": "gemma3_text",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
}
QWEN2_SLIDING = {  # layer 0 full attention, the others a window of 4 (max_window_layers=1)
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "use_sliding_window": True,
    "sliding_window": 4,
    "max_window_layers": 1,
}


def _vision(name: str) -> nn.Module:
    import timm
    import torchvision

    torch.manual_seed(0)
    builders = {
        "torchvision-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
        "timm-resnet18": lambda: timm.create_model(
            "resnet18", num_classes=10, channels=(16, 32, 64, 128), stem_width=16
        ),
        "timm-vit": lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10
        ),
        "timm-efficientnet-lite0": lambda: timm.create_model(
            "tf_efficientnet_lite0", num_classes=10
        ),
        "torchvision-mobilenet-v2": lambda: torchvision.models.mobilenet_v2(
            num_classes=10, width_mult=0.25
        ),
        "timm-convnext": lambda: timm.create_model("convnext_atto", num_classes=10),
    }
    return builders[name]().eval()


FAMILY_MODELS = {
    "gemma3": lambda: tiny_causal_lm(GEMMA3, 4),
    "qwen2-sliding": lambda: tiny_causal_lm(QWEN2_SLIDING, 3),
    "llama": lambda: _model("llama"),
    "opt": lambda: _model("opt"),
    "gpt2": lambda: _model("gpt2"),
    **{
        name: (lambda name=name: _vision(name))
        for name in (
            "torchvision-resnet18",
            "timm-resnet18",
            "timm-vit",
            "timm-efficientnet-lite0",
            "torchvision-mobilenet-v2",
            "timm-convnext",
        )
    },
}
FAMILY_CHAINS = {
    "gemma3": 4,
    "qwen2-sliding": 3,
    "llama": 3,
    "opt": 3,
    "gpt2": 3,
    "torchvision-resnet18": 8,
    "timm-resnet18": 8,
    "timm-vit": 3,
    "timm-efficientnet-lite0": 16,
    "torchvision-mobilenet-v2": 19,
    "timm-convnext": 16,
}


FAMILY_CAPTURES = {
    **{family: blocks - 1 for family, blocks in FAMILY_CHAINS.items()},
    "torchvision-resnet18": 3,  # across stages only (ResNet.forward calls them)
    "timm-resnet18": 3,
    "timm-vit": 0,  # blocks: a plain Sequential
    "timm-efficientnet-lite0": 0,  # blocks: a plain Sequential of plain Sequentials
    "torchvision-mobilenet-v2": 0,  # features: the same
    "timm-convnext": 3 + 4,  # into each stage's downsample, then its first block
}
"""Capture passes the engine makes: one per block that the model does not provably feed the
previous block's output alone (``feeds_directly``)."""


def _family_batches(model: nn.Module) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if hasattr(model, "config"):  # a causal LM: 3 batches of 2 x 16 token ids
        return [torch.randint(0, 384, (2, 16), generator=generator) for _ in range(3)]
    return [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(3)]


def _family_forward(model, batch):
    return model(input_ids=batch, use_cache=False) if hasattr(model, "config") else model(batch)


def _halve(layers: dict[str, nn.Module]) -> None:
    """A stand-in compression: zero the first half of each layer's input columns."""
    for layer in layers.values():
        w = weight_matrix(layer)
        w[:, : w.shape[1] // 2] = 0


def _reference_inputs(model, targets, batches, compressed: bool) -> dict[str, list[torch.Tensor]]:
    """The inputs of every target layer in plain forwards of the whole model: of the dense model
    ("original"), or, block by block, of the model with the blocks before compressed."""
    import copy

    from ppq_lightning.calibration.blocks import find_block_chain

    model = copy.deepcopy(model)
    chain = find_block_chain(model)
    names = list(targets)
    by_block: dict[int, list[str]] = {}
    for name in names:
        by_block.setdefault(chain.index_of(name), []).append(name)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for index in sorted(by_block, key=lambda i: (i is None, i or 0)):
        layers = {n: model.get_submodule(n) for n in by_block[index]}
        hooks = [
            layer.register_forward_hook(
                lambda mod, args, out, name=name: seen[name].append(args[0].detach().clone())
            )
            for name, layer in layers.items()
        ]
        with torch.no_grad():
            for batch in batches:
                _family_forward(model, batch)
        for hook in hooks:
            hook.remove()
        if compressed:
            with torch.no_grad():
                _halve(layers)
    return seen


@pytest.mark.parametrize("calibrate_on", ["compressed", "original"])
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_every_target_layer_sees_exactly_what_a_plain_forward_gives_it(family, calibrate_on):
    model = FAMILY_MODELS[family]()
    from ppq_lightning.calibration.blocks import find_block_chain

    assert len(find_block_chain(model)) == FAMILY_CHAINS[family]
    targets = resolve_targets(model)
    batches = _family_batches(model)
    expected = _reference_inputs(model, targets, batches, calibrate_on == "compressed")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}

    def observe(name, layer, x):
        seen[name].append(x.detach().clone())

    halve = _halve if calibrate_on == "compressed" else (lambda layers: None)
    report = calibrate_sequentially(
        model, targets, batches, observe, halve, calibrate_on=calibrate_on, forward=_family_forward
    )
    assert report.capture_passes == FAMILY_CAPTURES[family]
    for name in targets:
        assert len(seen[name]) == len(expected[name]) == len(batches), name
        for got, want in zip(seen[name], expected[name], strict=True):
            assert torch.equal(got, want), name
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layers_of_different_attention_types_get_different_masks():
    """Why each block needs its own call arguments: Gemma3's sliding and full layers differ."""
    from ppq_lightning.calibration.blocks import find_block_chain
    from ppq_lightning.calibration.capture import recording_block_inputs

    model = tiny_causal_lm(GEMMA3, 4)
    chain = find_block_chain(model)
    batch = _family_batches(model)[0]
    with (
        recording_block_inputs(chain.blocks[0]) as sliding,
        recording_block_inputs(chain.blocks[1]) as full,
        torch.no_grad(),
    ):
        _family_forward(model, batch)
    window, causal = sliding.kwargs[0]["attention_mask"], full.kwargs[0]["attention_mask"]
    assert window is not None  # a banded mask; the full layer's is None (SDPA is_causal) or another
    assert causal is None or not torch.equal(window, causal)
