"""The one assertion of the bad-input catalogue: refused clearly, and nothing changed.

Every case of ``tests/bad_inputs`` calls :func:`assert_refused`: the call raises ``error`` with
a message matching ``match`` (which names the argument and the value given), and the model's
state dict and the output folder are exactly what they were before the call.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn


def model_fingerprint(model: nn.Module | None) -> dict[str, Any]:
    """Every tensor of ``model.state_dict()`` (cloned) and every other entry as is."""
    if model is None:
        return {}
    return {
        key: value.detach().clone() if isinstance(value, torch.Tensor) else value
        for key, value in model.state_dict().items()
    }


def folder_fingerprint(folder: Path | None) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (empty if it is absent)."""
    if folder is None or not Path(folder).exists():
        return {}
    root = Path(folder)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_same_state(before: dict[str, Any], model: nn.Module | None) -> None:
    after = model_fingerprint(model)
    assert before.keys() == after.keys(), "the call added or removed state-dict entries"
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.shape == after[key].shape and torch.equal(
                value.nan_to_num(), after[key].nan_to_num()
            ), f"{key} changed"
        else:
            assert value == after[key], f"{key} changed"


def assert_refused(
    call: Callable[[], Any],
    error: type[BaseException],
    match: str,
    model: nn.Module | None = None,
    folder: Path | None = None,
) -> pytest.ExceptionInfo:
    """Run ``call``; assert it raises ``error`` matching ``match`` (a regex searched in the
    message) and leaves ``model`` and ``folder`` as they were."""
    state, files = model_fingerprint(model), folder_fingerprint(folder)
    with pytest.raises(error, match=match) as info:
        call()
    assert_same_state(state, model)
    assert folder_fingerprint(folder) == files, "the call changed the output folder"
    return info


def names(*parts: str) -> str:
    """A ``match`` pattern requiring every part (escaped) in the message, in any order."""
    return "".join(f"(?=[\\s\\S]*{re.escape(p)})" for p in parts)


ROOT = Path(__file__).parents[2]


def tiny_fit_config(tmp_path: Path, max_steps: int) -> Path:
    """``configs/tiny/lora_orders.yaml`` (the tiny LoRA fit, P>Q>L) for ``max_steps`` steps with
    a checkpoint into ``tmp_path/ckpts`` after every step and its logs under ``tmp_path/logs``,
    written to ``tmp_path/fit.yaml``."""
    config = yaml.safe_load((ROOT / "configs/tiny/lora_orders.yaml").read_text())
    config["trainer"].update(enable_checkpointing=True, max_steps=max_steps)
    config["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "every_n_train_steps": 1},
        }
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
