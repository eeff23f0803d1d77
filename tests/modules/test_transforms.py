import copy
import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.transforms import (
    TRANSFORM_ATTRIBUTE,
    attach_weight_transform,
    detach_weight_transform,
    has_weight_transform,
    transformed_weight,
)
from ppq_lightning.ops.ste import round_ste


def coarse(weight: torch.Tensor, step: float = 0.25) -> torch.Tensor:
    """Round to multiples of ``step`` (straight-through): a stand-in for fake quantization."""
    return step * round_ste(weight / step)


def test_linear_forward_uses_the_transformed_weight_until_detached():
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 4), torch.randn(3, 8)
    original, keys = layer(x), list(layer.state_dict())
    attach_weight_transform(layer, coarse)
    assert has_weight_transform(layer) and getattr(layer, TRANSFORM_ATTRIBUTE) is coarse
    torch.testing.assert_close(layer(x), F.linear(x, coarse(layer.weight), layer.bias))
    assert not torch.allclose(layer(x), original)
    assert list(layer.state_dict()) == keys  # no renamed or added keys
    assert detach_weight_transform(layer) is coarse
    assert not has_weight_transform(layer) and "forward" not in layer.__dict__
    assert torch.equal(layer(x), original)
    assert detach_weight_transform(layer) is None  # nothing attached: a no-op


def test_gradient_reaches_the_latent_weight_through_the_ste():
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 4), torch.randn(3, 8)
    attach_weight_transform(layer, coarse)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(4, 8))  # as if untransformed
    detach_weight_transform(layer)


def test_conv2d_and_hf_conv1d_layouts():
    torch.manual_seed(0)
    conv, image = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)
    attach_weight_transform(conv, coarse)
    torch.testing.assert_close(conv(image), F.conv2d(image, coarse(conv.weight), conv.bias, 1, 1))
    detach_weight_transform(conv)
    gpt2, x = Conv1D(4, 8), torch.randn(2, 3, 8)  # weight stored (in=8, out=4)
    torch.nn.init.normal_(gpt2.weight)
    original = gpt2(x)
    attach_weight_transform(gpt2, coarse)
    torch.testing.assert_close(gpt2(x), x @ coarse(gpt2.weight) + gpt2.bias)
    assert torch.equal(transformed_weight(gpt2), coarse(gpt2.weight))
    detach_weight_transform(gpt2)
    assert torch.equal(gpt2(x), original)


def test_an_instance_forward_is_restored_and_a_module_transform_adds_no_keys():
    layer, x = nn.Linear(4, 2), torch.randn(1, 4)
    wrapped = partial(nn.Linear.forward, layer)  # e.g. a hook library's instance forward
    layer.forward = wrapped
    transform = nn.Identity()  # a module-valued transform must not become a submodule
    attach_weight_transform(layer, transform)
    assert list(layer.state_dict()) == ["weight", "bias"] and not list(layer.children())
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    detach_weight_transform(layer)
    assert layer.forward is wrapped


def test_copies_carry_their_own_transform():
    layer = nn.Linear(4, 2)
    attach_weight_transform(layer, coarse)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        x = torch.randn(1, 4)
        torch.testing.assert_close(clone(x), F.linear(x, coarse(clone.weight), clone.bias))
        assert clone.forward.args[0] is clone  # not the original layer


def test_refuses_a_second_transform_and_unsupported_layers():
    layer = nn.Linear(4, 2)
    attach_weight_transform(layer, coarse)
    with pytest.raises(PPQConfigError, match="already has a weight transform"):
        attach_weight_transform(layer, coarse)
    with pytest.raises(PPQConfigError, match="not Embedding"):
        attach_weight_transform(nn.Embedding(4, 2), coarse)
