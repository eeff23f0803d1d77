"""Reading a Lightning checkpoint of this project without running code from it.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, a
pickle that would build any other object (a pickle bomb) is refused. The LightningModule is
rebuilt from the checkpoint's hyperparameters, its recorded structural edits replayed, and its
state dict loaded strictly. Its class is the one the user names (a class, or ``ppq export
--module package.module.ClassName``), else the one the checkpoint names (LightningCLI's
``_class_path``, imported as ``LightningModule.load_from_checkpoint`` imports it), else one of
this project's modules recognised by its hyperparameters. Lightning's own checkpoints do not
name the class (a plain ``Trainer`` with ``ModelCheckpoint``): then it must be given. A checkpoint
written during ``fit`` while a training stage trained loads as the model computed at that step,
with a ``MidFitCheckpointWarning`` naming the stages it holds and those that had not fired
(``edits.training``).
"""

from __future__ import annotations

import importlib
import keyword
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import InvariantError, PPQConfigError, bad_value
from ppq_lightning.export.architecture import check_skeleton
from ppq_lightning.models import CausalLMModule, ImageClassifierModule

MODULES = (CausalLMModule, ImageClassifierModule)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with clear errors.

    Raises:
        PPQConfigError: on a missing file, one that is no checkpoint (a YAML file, text), a
            truncated one, or a pickle that needs code to run.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_value("ckpt", str(path), "an existing checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:4] != _ZIP_MAGIC and head[:1] != _PICKLE_PROTOCOL:
        raise bad_value(
            "ckpt",
            str(path),
            f"a checkpoint file, as Lightning's Trainer (ModelCheckpoint, save_checkpoint) and "
            f"torch.save write it (a zip archive, or a legacy pickle); this file starts with "
            f"{head!r} (a config, or another kind of file)",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PPQConfigError(
            f"{path} asks to run code on load, refused (torch.load(weights_only=True)): {first}"
        ) from err
    except (RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError) as err:
        raise PPQConfigError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err


_WHICH_CLASS = (
    "Is it the class the checkpoint was trained with (module_class; ppq export: --module), built "
    "with the same constructor arguments (init_args; ppq export: --module_args)?"
)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_PROTOCOL = b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a pickle


LIGHTNING_CLI_KEYS = ("_class_path", "_instantiator")
"""What LightningCLI records beside a module's hyperparameters: how it built it, not arguments."""


CLASS_PATH_EXAMPLE = "my_package.my_module.MyModule"
_CLASS_PATH = (
    "the dotted path of a LightningModule subclass in an importable module, "
    f"package.module.ClassName (e.g. {CLASS_PATH_EXAMPLE})"
)


def import_module_class(value: Any, argument: str = "module_class") -> type[L.LightningModule]:
    """The LightningModule class that the dotted path ``value`` names, imported.

    Importing the module runs its code, as LightningCLI's ``--model`` and Lightning's
    ``load_from_checkpoint`` of a LightningCLI checkpoint do; Python finds it on ``sys.path``
    (an installed package, or a folder on ``PYTHONPATH``).

    Args:
        value: ``package.module.ClassName``.
        argument: the argument as the user wrote it (``"--module"``), for the message.

    Returns:
        The class.

    Raises:
        PPQConfigError: naming ``argument`` and ``value``: not a dotted path of Python
            identifiers with a module part, a module that cannot be imported (with Python's
            reason), a name the module lacks, or an object that is not a LightningModule
            subclass.
    """
    parts = value.split(".") if isinstance(value, str) else []
    if len(parts) < 2 or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise bad_value(argument, value, _CLASS_PATH)
    module_name, _, name = value.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise bad_value(
            argument,
            value,
            f"{_CLASS_PATH}; importing {module_name!r} failed ({err}): install its package, or "
            "put the folder that holds it on PYTHONPATH",
        ) from err
    found = getattr(module, name, None)
    if found is None:
        raise bad_value(argument, value, f"{_CLASS_PATH}; {module_name!r} has no {name!r}")
    if not (isinstance(found, type) and issubclass(found, L.LightningModule)):
        raise bad_value(
            argument, value, f"{_CLASS_PATH}; {value!r} is {found!r}, not a LightningModule class"
        )
    return found


def _module_class(path: str | Path, saved: dict[str, Any]) -> type[L.LightningModule]:
    """The module class a checkpoint names or whose own hyperparameters it saved.

    Args:
        path: the checkpoint, for the messages.
        saved: its ``hyper_parameters``, LightningCLI's keys included.
    """
    class_path = saved.get("_class_path")
    if class_path is not None:  # LightningCLI's subclass mode (``ppq fit``): the class it built
        try:
            return import_module_class(class_path, "_class_path")
        except PPQConfigError as err:
            raise PPQConfigError(
                f"{path} names its module class in its hyperparameters (LightningCLI's "
                f"_class_path), which cannot be used here: {err} Or name the class yourself: "
                f"ppq export --ckpt {path} --module {CLASS_PATH_EXAMPLE} ..., or "
                "load_lightning_checkpoint(path, module_class=MyModule)."
            ) from err
    if "model_config" in saved:
        return CausalLMModule
    if "small_input" in saved:
        return ImageClassifierModule
    hparams = sorted(k for k in saved if k not in LIGHTNING_CLI_KEYS)
    raise PPQConfigError(
        f"{path} does not say which LightningModule it holds: Lightning's checkpoints do not "
        f"record the class, and its hyperparameters {hparams} are not those of "
        f"{[c.__name__ for c in MODULES]}. Name your module's class: on the command line "
        f"ppq export --ckpt {path} --module {CLASS_PATH_EXAMPLE} --format ppq --path OUT "
        "(with --module_args '{\"arg\": value}' for constructor arguments the hyperparameters "
        "lack), or from Python load_lightning_checkpoint(path, module_class=MyModule, "
        "**init_args)."
    )


def load_lightning_checkpoint(
    path: str | Path,
    module_class: type[L.LightningModule] | None = None,
    **init_args: Any,
) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint, compression states included.

    Args:
        path: a Lightning checkpoint (``ModelCheckpoint``'s, ``trainer.save_checkpoint``'s,
            weights-only or not, mid-fit or not), read with ``weights_only=True``.
        module_class: the LightningModule class to rebuild, built with the checkpoint's
            hyperparameters and ``init_args`` (a user's module, which need not call
            ``edits.enable_state_loading`` itself). None: the class the checkpoint names
            (LightningCLI's ``_class_path``: ``ppq fit``, a user's ``LightningCLI`` in
            subclass mode; imported, see :func:`import_module_class`), else this project's
            ``CausalLMModule`` or ``ImageClassifierModule``, recognised by their
            hyperparameters. A plain ``Trainer``'s checkpoint names no class: give it.
        **init_args: constructor arguments of the class that the checkpoint's hyperparameters
            lack or that replace them (as ``load_from_checkpoint``'s).

    Returns:
        The module, eval mode.

    Raises:
        PPQConfigError: see :func:`safe_torch_load`; ``module_class`` not a LightningModule
            class; hyperparameters that declare a model the checkpoint's tensors do not fit
            (checked on the meta device, before the model is allocated); without
            ``module_class``, a checkpoint that names no class and holds hyperparameters of
            no module of this project, or names one that cannot be imported
            (:func:`import_module_class`); a class that the hyperparameters and ``init_args``
            cannot build; a checkpoint whose stage records cannot be replayed or completed
            (``edits.enable_state_loading``).
    """
    if module_class is not None and not (
        isinstance(module_class, type) and issubclass(module_class, L.LightningModule)
    ):
        raise bad_value("module_class", module_class, "a LightningModule class, or None")
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PPQConfigError(f"{path} is not a Lightning checkpoint (no state_dict).")
    saved = dict(checkpoint.get("hyper_parameters") or {})
    cls = _module_class(path, saved) if module_class is None else module_class
    # LightningCLI adds its own keys to the module's (``ppq fit`` checkpoints): not arguments
    hparams = {k: v for k, v in saved.items() if k not in LIGHTNING_CLI_KEYS}
    hparams.update(init_args)
    if cls is ImageClassifierModule:
        hparams["pretrained"] = False  # every weight comes from the checkpoint
        hparams["checkpoint"] = None
    state_dict = checkpoint["state_dict"]
    if not (cls is CausalLMModule and hparams.get("model_config") is None):  # built, not read
        check_skeleton(  # a crafted config is refused before the model is allocated
            lambda: cls(**hparams),
            {k: v.shape for k, v in state_dict.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)},
            str(path),
            model=f"{cls.__module__}.{cls.__qualname__} built from the checkpoint's "
            f"hyperparameters and init_args {hparams}",
            advice=_WHICH_CLASS,
        )
    try:
        module = cls(**hparams)
    except TypeError as err:  # arguments the class does not take, or lacks
        raise PPQConfigError(
            f"{cls.__name__} cannot be built from the checkpoint's hyperparameters and "
            f"init_args {sorted(hparams)}: {err}. Pass the missing constructor arguments as "
            "init_args (ppq export: --module_args '{\"name\": value}')."
        ) from err
    enable_state_loading(module)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except (InvariantError, PPQConfigError) as err:  # a corrupt file: name it
        raise type(err)(f"{path}: {err}") from err
    except RuntimeError as err:
        if not str(err).startswith("Error(s) in loading state_dict"):
            raise  # not torch's missing/unexpected keys or size mismatches
        raise PPQConfigError(
            f"{path} does not fit {cls.__module__}.{cls.__qualname__} built from the "
            f"checkpoint's hyperparameters and init_args {hparams}: {err}\n{_WHICH_CLASS}"
        ) from err
    return module.eval()
