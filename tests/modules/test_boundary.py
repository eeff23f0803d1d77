"""A model's output layer and stem, found from the graph of one forward (modules.boundary),
and the default targets that leave them out."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torchvision
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.modules.boundary import boundary_layers, trace_boundary
from ppq_lightning.modules.targets import resolve_targets

IMAGES = torch.randn(2, 3, 32, 32)


class UserResNet(L.LightningModule):
    """A user's classifier: a torchvision ResNet, normalising its input in forward."""

    def __init__(self, example: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torchvision.models.resnet18(weights=None, num_classes=10)
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        if example:
            self.example_input_array = IMAGES

    def forward(self, x):
        return self.model((x - self.mean) / 0.25)


def test_the_demo_transformers_vocabulary_projection_is_its_output_layer():
    torch.manual_seed(0)
    module = LightningTransformer(vocab_size=64)
    tokens = torch.randint(0, 64, (2, 8))
    # decoder -> log_softmax -> view: the output is not the decoder's own tensor
    assert trace_boundary(module, lambda: module(tokens, tokens)) == {"model.decoder": "output"}
    targets = resolve_targets(module)
    assert "model.decoder" not in targets
    assert "model.transformer.encoder.layers.0.self_attn.q_proj" in targets  # no stem: embedding


def test_a_resnets_stem_and_classifier_through_the_ops_of_a_users_forward():
    module = UserResNet()
    before = {n: b.clone() for n, b in module.named_buffers()}
    module.train()
    found = trace_boundary(module, lambda: module(IMAGES))
    assert found == {"model.conv1": "stem", "model.fc": "output"}
    assert module.training and all(m.training for m in module.modules())  # modes restored
    assert all(torch.equal(b, before[n]) for n, b in module.named_buffers())  # eval: no BN update
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    targets = resolve_targets(module)
    assert {"model.conv1", "model.fc"}.isdisjoint(targets)
    assert {"model.layer1.0.conv1", "model.layer2.0.downsample.0"} <= set(targets)
    # the marks are on the layers: the inner network knows them too
    assert {"conv1", "fc"}.isdisjoint(resolve_targets(module.model))


def test_example_input_array_is_traced_when_nothing_else_was():
    module = UserResNet(example=True)
    assert boundary_layers(module) == {"model.conv1": "stem", "model.fc": "output"}


def test_without_an_example_the_output_layer_and_stem_are_ordinary_layers():
    module = UserResNet()
    assert boundary_layers(module) == {}
    assert {"model.conv1", "model.fc"} <= set(resolve_targets(module))


def test_a_vits_patch_embedding_and_head_and_timm_declarations():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    )  # fmt: skip
    assert trace_boundary(vit, lambda: vit(IMAGES)) == {"conv_proj": "stem", "heads.head": "output"}
    untraced = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert boundary_layers(untraced) == {"conv1": "stem", "fc": "output"}  # get_classifier, cfg


def test_a_model_that_declares_its_boundary_is_not_traced():
    classifier = ImageClassifierModule.from_model(
        torchvision.models.resnet18(weights=None, num_classes=10), compress_head=True
    )
    classifier.example_input_array = IMAGES
    targets = resolve_targets(classifier)
    assert "model.fc" in targets and "model.conv1" not in targets  # its default_ignore
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    llm = LlamaForCausalLM(config)
    llm.example_input_array = torch.randint(0, 64, (1, 8))
    assert boundary_layers(llm) == {}  # its declared output embeddings: no trace
    names = {n.rpartition(".")[2] for n in resolve_targets(llm)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_model_whose_only_layer_is_its_boundary_says_so():
    model = BoringModel()
    trace_boundary(model, lambda: model(torch.randn(2, 32)))
    with pytest.raises(PPQConfigError, match=r"layer \(its output layer\); name them in `targets`"):
        resolve_targets(model)
    assert list(resolve_targets(model, targets="layer")) == ["layer"]


def test_a_new_trace_replaces_the_marks_of_the_last():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    trace_boundary(model, lambda: model(torch.randn(3, 4)))
    assert list(resolve_targets(model)) == ["2"]
    del model[3]
    assert trace_boundary(model, lambda: model(torch.randn(3, 4))) == {"0": "stem", "2": "output"}
