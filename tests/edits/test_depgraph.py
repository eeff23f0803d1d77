import copy

import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.compressed.state import current_mask, get_state
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.edits.depgraph import (
    DEPGRAPH_PRUNING,
    output_layers,
    prune_channels,
    replay_depgraph,
)
from ppq_lightning.edits.registry import EDITS
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.models.vision import load_image_classifier
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import is_compressible, weight_matrix

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
ENTRY = {"stage": "DepGraphPruning{}", "method": "DepGraphPruning", "kind": "P"}


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _resnet() -> nn.Module:
    torch.manual_seed(0)  # the tests' sparsity bounds hold for this initialisation
    return load_image_classifier("resnet18", num_classes=10, model_kwargs=TINY_RESNET)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return load_image_classifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT)


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if is_compressible(m))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _same_state(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def _counted(model: nn.Module) -> int:
    """Weights of the default targets (timm declares the stem and classifier: left out)."""
    return sum(m.weight.numel() for m in resolve_targets(model).values())


def test_prune_channels_shrinks_a_resnet_and_records_the_edit():
    model, x = _resnet(), _images()
    weights, parameters = _counted(model), sum(p.numel() for p in model.parameters())
    result = prune_channels(model, x[:1], 0.3, [model.fc], ENTRY)
    assert sum(p.numel() for p in model.parameters()) < 0.7 * parameters
    assert result["removed_weights"] == weights - _counted(model) > 0  # where C counts
    assert result["groups"] > 0
    assert model.fc.out_features == 10
    assert model.conv1.out_channels == 44  # 64 * 0.7, with the residual stream it feeds
    assert model.layer1[0].conv1.out_channels == 11  # 16 * 0.7, a block's inner width
    assert model.fc.in_features == model.layer4[1].conv2.out_channels < 128
    assert _outputs(model, x).shape == (2, 10)
    (entry,) = get_state(model).history
    assert entry["edit"] == DEPGRAPH_PRUNING
    assert entry["example"] == {
        "args": [{"shape": [1, 3, 32, 32], "dtype": "float32"}],
        "kwargs": {},
    }
    assert entry["removed_weights"] == result["removed_weights"]
    assert entry["num_heads"] == {} and entry["pruning_history"]
    assert {k: entry[k] for k in ENTRY} == ENTRY


def test_ignored_layers_keep_their_output_channels():
    model = _resnet()
    prune_channels(model, _images(1), 0.3, [model.fc, model.conv1], ENTRY)
    assert model.conv1.out_channels == 64  # and so the inputs that read it
    assert model.layer1[0].conv1.in_channels == model.layer1[0].downsample[0].in_channels == 64
    assert model.layer1[0].conv1.out_channels == 11
    assert model.fc.out_features == 10


def test_prune_channels_round_to_keeps_widths_multiples():
    model = _resnet()
    prune_channels(model, _images(1), 0.3, [model.fc], ENTRY, round_to=8)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    assert widths[1] == 8  # layer1.0.conv1: 16 -> 8


def test_prune_channels_of_vit_heads():
    model, x = _vit(), _images()
    assert model.blocks[0].attn.num_heads == 3
    prune_channels(model, x[:1], 0.5, [model.head, model.patch_embed.proj], ENTRY, True)
    for block in model.blocks:
        attention = block.attn
        assert attention.num_heads < 3
        assert attention.qkv.out_features == 3 * attention.num_heads * attention.head_dim
        assert attention.head_dim == 64
    assert _outputs(model, x).shape == (2, 10)
    assert get_state(model).history[0]["num_heads"] == {
        "blocks.0.attn": model.blocks[0].attn.num_heads,
        "blocks.1.attn": model.blocks[1].attn.num_heads,
    }


def test_earlier_masks_and_per_channel_grids_are_sliced_with_the_weights():
    module, x = ImageClassifierModule.from_model(_resnet()), _images()
    MagnitudePruning(sparsity=0.5).apply(module)
    RTNQuantization(bits=4).apply(module)
    prune_channels(module, x[:1], 0.3, [module.model.fc], ENTRY)
    targets = resolve_targets(module)
    assert check_invariants(module) == len(targets) == 20
    for name, layer in targets.items():
        state = get_state(layer)
        assert state.mask.shape == layer.weight.shape, name
        assert state.scale.shape == (layer.weight.shape[0], 1), name
        assert (layer.weight[~state.mask] == 0).all(), name
        sparsity = 1 - state.mask.float().mean().item()
        assert 0.4 < sparsity < 0.6, name  # a mis-sliced mask would not stay near 1/2


def test_sliced_masks_match_the_surviving_zeros_exactly():
    model, x = _resnet(), _images()
    MagnitudePruning(sparsity=0.5).apply(model, dataloader=None)
    prune_channels(model, x[:1], 0.3, [model.fc], ENTRY)
    pruned = [m for m in model.modules() if is_compressible(m) and current_mask(m) is not None]
    assert len(pruned) == 20  # a bare timm model declares its stem and classifier: left dense
    for layer in pruned:
        assert torch.equal(current_mask(layer), weight_matrix(layer) != 0)
    assert check_invariants(model) == 20


def test_grouped_grids_refuse_losing_input_channels_and_nothing_changes():
    model = _resnet()
    RTNQuantization(bits=4, group_size=16, targets=r"^layer").apply(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PPQConfigError, match=r"cannot remove input columns .*group_size=16"):
        prune_channels(model, _images(1), 0.3, [model.fc], ENTRY)
    assert _same_state(model.state_dict(), state)
    assert model.layer1[0].conv1.out_channels == 16 and get_state(model) is None


def test_replay_depgraph_is_the_registered_replay():
    assert EDITS[DEPGRAPH_PRUNING].replay is replay_depgraph
    model, x = _resnet(), _images()
    prune_channels(model, x[:1], 0.3, [model.fc], ENTRY)
    fresh = _resnet()
    replay_depgraph(fresh, "", get_state(model).history[0])
    shapes = {k: v.shape for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: s for k, s in shapes.items() if ".ppq_state." not in k and k != "ppq_state.mask_bits"
    }


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_pruned_state_dict_loads_into_a_fresh_model(family):
    build = _resnet if family == "resnet" else _vit
    model, x = build(), _images()
    if family == "resnet":
        RTNQuantization(bits=8).apply(model)
        prune_channels(model, x[:1], 0.3, [model.fc], ENTRY)
    else:
        prune_channels(model, x[:1], 0.5, [model.head, model.patch_embed.proj], ENTRY, True)
    expected = _outputs(model, x)
    fresh = build()
    enable_state_loading(fresh)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_outputs(fresh, x), expected)
    assert check_invariants(fresh) == check_invariants(model)
    if family == "vit":
        assert [b.attn.num_heads for b in fresh.blocks] == [b.attn.num_heads for b in model.blocks]


class _LogSoftmaxNet(nn.Module):
    """A classifier returning ``log_softmax`` of its head: no layer's output is the model's
    output, though the result is allocated where the freed LayerNorm output was."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x)).flatten(1)
        return self.fc(self.norm(x)).log_softmax(-1)


def test_output_layers_are_the_layers_returning_the_output_object_not_a_reused_id():
    model = _LogSoftmaxNet()
    assert output_layers(model, torch.randn(2, 3, 8, 8)) == []  # was [model.norm]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(288, 4))
    assert output_layers(plain, torch.randn(2, 3, 8, 8)) == [plain[2]]
