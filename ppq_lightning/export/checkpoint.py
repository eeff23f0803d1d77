"""Reading a Lightning checkpoint of this project without running code from it.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, a
pickle that would build any other object (a pickle bomb) is refused. The LightningModule is
rebuilt from the checkpoint's hyperparameters, its recorded structural edits replayed, and its
state dict loaded strictly.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.models import CausalLMModule, ImageClassifierModule

MODULES = (CausalLMModule, ImageClassifierModule)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with clear errors.

    Raises:
        PPQConfigError: on a missing file, a truncated one, or a pickle that needs code to run.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_value("ckpt", str(path), "an existing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PPQConfigError(
            f"{path} asks to run code on load, refused (torch.load(weights_only=True)): {first}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise PPQConfigError(f"{path} is not a readable checkpoint (truncated?): {err}") from err


LIGHTNING_CLI_KEYS = ("_class_path", "_instantiator")
"""What LightningCLI records beside a module's hyperparameters: how it built it, not arguments."""


def _module_class(hparams: dict[str, Any]) -> type[L.LightningModule]:
    """The module class whose own hyperparameters the checkpoint saved."""
    if "model_config" in hparams:
        return CausalLMModule
    if "small_input" in hparams:
        return ImageClassifierModule
    raise PPQConfigError(
        f"the checkpoint's hyperparameters {sorted(hparams)} are not those of "
        f"{[c.__name__ for c in MODULES]}."
    )


def load_lightning_checkpoint(path: str | Path) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint, compression states included.

    Raises:
        PPQConfigError: see :func:`safe_torch_load`, or hyperparameters of another module.
    """
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PPQConfigError(f"{path} is not a Lightning checkpoint (no state_dict).")
    hparams = {  # LightningCLI adds its own keys to the module's (``ppq fit`` checkpoints)
        k: v
        for k, v in (checkpoint.get("hyper_parameters") or {}).items()
        if k not in LIGHTNING_CLI_KEYS
    }
    cls = _module_class(hparams)
    if cls is ImageClassifierModule:
        hparams["pretrained"] = False  # every weight comes from the checkpoint
        hparams["checkpoint"] = None
    module = cls(**hparams)
    enable_state_loading(module)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval()
