"""What rebuilds the uncompressed architecture of an exported model, as a JSON record.

An export stores the weights; the loader needs the module tree they fit, before the structural
edits its history replays. Three kinds are recorded:

- ``transformers``: a Hugging Face model, by its class name and ``config.to_dict()``;
- ``image_classifier``: a model of :class:`~ppq_lightning.models.ImageClassifierModule`, by the
  arguments that built it (rebuilt without downloading: pretrained weights are overwritten);
- ``module``: any other ``nn.Module``, by its class name only: the loader must be handed a
  freshly built one (``load_compressed(path, model=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ppq_lightning.compressed.state import STATE_NAME, compressed_modules
from ppq_lightning.edits.blocks import BLOCK_REMOVAL
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models.image_classifier import ImageClassifierModule

# the ImageClassifierModule arguments that decide the architecture
_CLASSIFIER_ARGS = ("model", "source", "num_classes", "in_chans", "model_kwargs", "small_input")


def _is_transformers(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return hasattr(config, "to_dict") and hasattr(module, "from_pretrained")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a LightningModule: ``.model`` of a module of this project; the one
    transformers model a user's LightningModule holds when its other children have no weights
    (torchmetrics objects, losses), as ``self.model = AutoModelForCausalLM...`` or ``self.lm``;
    else ``model`` itself."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "evaluate"):
        return inner
    if isinstance(model, L.LightningModule):
        children = list(model.children())
        networks = [c for c in children if _is_transformers(c)]
        weighted = [c for c in children if next(c.parameters(), None) is not None]
        if len(networks) == 1 and weighted == networks:
            return networks[0]
    return model


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def wrap(built: nn.Module, wrapper: str | None) -> nn.Module:
    """What an export of a LightningModule (``wrapper``: its class name) loads back into."""
    from ppq_lightning.models import CausalLMModule

    if wrapper == "CausalLMModule":
        return CausalLMModule.from_model(built)
    if wrapper in (None, "ImageClassifierModule"):  # build() made the module itself
        return built
    raise PPQConfigError(f"the export was made from a {wrapper}; pass one: model=...")


def edited_layers(network: nn.Module) -> list[str]:
    """Layers whose history records a structural edit or unmerged LoRA adapters, or records
    that sit on a container (no weight): what a format of the original architecture cannot
    hold."""
    found = []
    for name, module, state in compressed_modules(network):
        edited = any("edit" in entry or entry.get("adapter_weights") for entry in state.history)
        if edited or not isinstance(getattr(module, "weight", None), torch.Tensor):
            found.append(name or "<root>")
    return found


def describe(model: nn.Module) -> dict[str, Any]:
    """The architecture record of ``model`` (a LightningModule of this project or a network)."""
    if isinstance(model, ImageClassifierModule) and "model" in model.hparams:
        args = {key: model.hparams.get(key) for key in _CLASSIFIER_ARGS}
        return {"kind": "image_classifier", "args": args}
    network = unwrap(model)
    if _is_transformers(network):
        config = network.config
        record = {"kind": "transformers", "class": type(network).__name__}
        return record | {"config": _original_config(network, config.to_dict())}
    return {"kind": "module", "class": f"{type(network).__module__}.{type(network).__qualname__}"}


def _original_config(network: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """The config as it was before any block removal (from the first removal's record).

    Raises:
        PPQConfigError: for a removal recorded before ``depth_config`` was (re-run the stage).
    """
    for _, _, state in compressed_modules(network):
        for entry in state.history:
            if entry.get("edit") == BLOCK_REMOVAL:
                if "depth_config" not in entry:
                    raise PPQConfigError(
                        "the model's block removal was recorded by an older ppq-lightning "
                        "without the original depth: re-run the stage to export it."
                    )
                return config | entry["depth_config"]
    return config


def build(record: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A freshly initialised model of the recorded architecture, in ``dtype``, eval mode: a
    transformers network, or an ``ImageClassifierModule`` (which holds its network).

    Raises:
        PPQConfigError: for a ``module`` record (the caller must pass the model) or an unknown
            transformers class.
    """
    kind = record.get("kind")
    if kind == "transformers":
        import transformers

        config = dict(record["config"])
        model_type = config.pop("model_type")
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
        cls = getattr(transformers, record["class"], None)
        if cls is None:
            raise PPQConfigError(
                f"the export was made from transformers class {record['class']!r}, which this "
                f"transformers {transformers.__version__} does not have."
            )
        with torch.random.fork_rng(devices=[]):  # every weight is overwritten by the export
            return cls._from_config(hf_config, dtype=dtype).eval()
    if kind == "image_classifier":
        return ImageClassifierModule(**record["args"]).to(dtype).eval()
    raise PPQConfigError(
        f"the export holds a {record.get('class', 'custom')} model, which it cannot rebuild by "
        "itself: pass a freshly built one, load_compressed(path, model=MyModel(...))."
    )


def _edited_prefixes(extra_states: dict[str, Any]) -> list[str]:
    """Module prefixes (``"model.layers.0.mlp."``) whose recorded history holds a structural
    edit or adapters: the shapes below them are the edit's, not the architecture's."""
    prefixes = []
    for key, value in extra_states.items():
        history = value.get("history") if isinstance(value, dict) else None
        if not key.endswith(f"{STATE_NAME}._extra_state") or not isinstance(history, list):
            continue
        prefix = key[: -len(f"{STATE_NAME}._extra_state")]
        for entry in history:
            if not isinstance(entry, dict):
                continue
            if entry.get("edit") == BLOCK_REMOVAL and isinstance(entry.get("container"), str):
                prefixes.append(f"{prefix}{entry['container']}.")  # the blocks, not the model
            elif "edit" in entry or entry.get("adapter_weights"):
                prefixes.append(prefix)
    return prefixes


SMALL_MODEL_BYTES = 64 * 2**20
"""A declared model up to this size (or twice the file's tensors) is built without the meta check:
the real load's errors are more precise, and it costs little."""


def check_skeleton(
    make: Callable[[], nn.Module],
    declared: dict[str, torch.Size],
    extra_states: dict[str, Any],
    source: str,
    model: str = "the architecture it declares",
    advice: str = "The file is corrupt or was not written for this model.",
) -> None:
    """Refuse, before the model is built in memory, a file whose tensors do not fit the
    architecture it declares (a crafted or corrupt config: a 1.5 GB model built to be refused).

    The model is built on the meta device (no memory). When it takes more than twice the bytes
    of the file's tensors (and more than ``SMALL_MODEL_BYTES``), every tensor of its state dict
    that the file holds, outside modules whose history records a structural edit or adapters,
    must have the file's shape, and the tensors the file lacks (outside them: a LoRA layer's base
    weight, stored under ``base_layer``) must not take more bytes than the file's tensors do.

    Args:
        make: builds the model the file will be loaded into.
        declared: ``{state-dict key: shape}`` the file holds.
        extra_states: the file's non-tensor state-dict entries (the compression records).
        source: the file, for the message.
        model: what ``make`` builds, for the message.
        advice: the message's last sentence: what to do.

    Raises:
        PPQConfigError: naming the file, the first tensor that does not fit, both shapes, and
            the bytes the declared architecture would have taken.
    """
    try:
        with torch.device("meta"):
            skeleton = make()
    except Exception:  # not buildable without memory: the real load judges
        return
    edited = _edited_prefixes(extra_states)
    skeleton_state = skeleton.state_dict()
    total = sum(
        t.numel() * t.element_size() for t in skeleton_state.values() if isinstance(t, Tensor)
    )
    held = sum(shape.numel() for shape in declared.values()) * max(
        (t.element_size() for t in skeleton_state.values() if isinstance(t, Tensor)), default=4
    )
    if total <= max(2 * held, SMALL_MODEL_BYTES):
        return  # nothing large: the real load says more precisely what does not fit
    lacking: list[str] = []
    lacking_bytes = 0
    for key, tensor in skeleton_state.items():
        if not isinstance(tensor, Tensor) or STATE_NAME in key.split("."):
            continue
        if any(key.startswith(prefix) for prefix in edited):
            continue
        shape = declared.get(key)
        if shape is None:
            lacking.append(key)
            lacking_bytes += tensor.numel() * tensor.element_size()
        elif shape != tensor.shape:
            raise PPQConfigError(
                f"{source} does not fit {model}: size mismatch for {key}: "
                f"{list(tensor.shape)} in the model, {list(shape)} in the file; refused before "
                f"building it ({total / 2**20:.0f} MiB). {advice}"
            )
    if lacking_bytes > held:
        raise PPQConfigError(
            f"{source} does not fit {model}: {len(lacking)} of its tensors "
            f"({lacking_bytes / 2**20:.0f} MiB, e.g. {lacking[0]}) are not in the file, which "
            f"holds {held / 2**20:.0f} MiB; refused before building it ({total / 2**20:.0f} "
            f"MiB). {advice}"
        )
