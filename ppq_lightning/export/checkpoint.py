"""Reading a Lightning checkpoint of this project without running code from it.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, a
pickle that would build any other object (a pickle bomb) is refused. The LightningModule is
rebuilt from the checkpoint's hyperparameters (this project's modules, or the class a user
names), its recorded structural edits replayed, and its state dict loaded strictly. A checkpoint
written during ``fit`` while a training stage trained loads as the model computed at that step,
with a ``MidFitCheckpointWarning`` naming the stages it holds and those that had not fired
(``edits.training``).
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
        f"{[c.__name__ for c in MODULES]}: for a module of your own, pass its class "
        "(load_lightning_checkpoint(path, module_class=MyModule))."
    )


def load_lightning_checkpoint(
    path: str | Path,
    module_class: type[L.LightningModule] | None = None,
    **init_args: Any,
) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint, compression states included.

    Args:
        path: a Lightning checkpoint (``ModelCheckpoint``'s, ``trainer.save_checkpoint``'s,
            weights-only or not), read with ``weights_only=True``.
        module_class: the LightningModule class to rebuild, built with the checkpoint's
            hyperparameters and ``init_args`` (a user's module, which need not call
            ``edits.enable_state_loading`` itself); None for this project's modules
            (``CausalLMModule``, ``ImageClassifierModule``), recognised by their
            hyperparameters.
        **init_args: constructor arguments of ``module_class`` that the checkpoint's
            hyperparameters lack or that replace them (as ``load_from_checkpoint``'s).

    Raises:
        PPQConfigError: see :func:`safe_torch_load`; ``module_class`` not a LightningModule
            class; ``init_args`` without ``module_class``; without ``module_class``,
            hyperparameters of another module; a class that the hyperparameters and
            ``init_args`` cannot build; a checkpoint whose stage records cannot be replayed or
            completed (``edits.enable_state_loading``).
    """
    if module_class is not None and not (
        isinstance(module_class, type) and issubclass(module_class, L.LightningModule)
    ):
        raise bad_value("module_class", module_class, "a LightningModule class, or None")
    if init_args and module_class is None:
        raise PPQConfigError(
            f"init_args {sorted(init_args)} need module_class: this project's modules are "
            "rebuilt from the checkpoint's hyperparameters alone."
        )
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PPQConfigError(f"{path} is not a Lightning checkpoint (no state_dict).")
    hparams = {  # LightningCLI adds its own keys to the module's (``ppq fit`` checkpoints)
        k: v
        for k, v in (checkpoint.get("hyper_parameters") or {}).items()
        if k not in LIGHTNING_CLI_KEYS
    }
    cls = _module_class(hparams) if module_class is None else module_class
    hparams.update(init_args)
    if cls is ImageClassifierModule:
        hparams["pretrained"] = False  # every weight comes from the checkpoint
        hparams["checkpoint"] = None
    try:
        module = cls(**hparams)
    except TypeError as err:  # arguments the class does not take, or lacks
        raise PPQConfigError(
            f"{cls.__name__} cannot be built from the checkpoint's hyperparameters and "
            f"init_args {sorted(hparams)}: {err}. Pass the missing constructor arguments as "
            "init_args."
        ) from err
    enable_state_loading(module)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval()
