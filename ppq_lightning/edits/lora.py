"""LoRA adapters (peft) in the compressed state: merging them into their base, keeping them,
and re-injecting kept adapters into a fresh model before a state dict is loaded.

``LoRAFineTune`` (``callbacks/lora.py``) injects peft adapters named :data:`ADAPTER`. Kept
(unmerged) adapters are recorded on their base layer (``...q_proj.base_layer``) with the edit
kind :data:`LORA_ADAPTERS`; a state dict saved then has ``...q_proj.lora_A.default.weight``
keys, which load into a fresh model once :func:`replay_lora_adapter` has re-injected the
adapter (rank and alpha/dropout from the recorded stage).
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ppq_lightning.compressed.history import HistoryEntry, recorded_size
from ppq_lightning.compressed.state import STATE_NAME, current_grid, current_mask, record_stage
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.tree import find_module, replace_module
from ppq_lightning.modules.views import as_matrix, set_weight_matrix, weight_matrix
from ppq_lightning.ops.projection import project

ADAPTER = "default"
LORA_ADAPTERS = "lora_adapters"
BASE_SUFFIX = ".base_layer"
LORA_METHOD = "LoRAFineTune"


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every peft LoRA layer of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_weights(layer: LoraLayer) -> int:
    """How many weights the adapters of ``layer`` hold."""
    return sum(p.numel() for n, p in layer.named_parameters() if n.startswith("lora_"))


def adapter_update(layer: LoraLayer) -> torch.Tensor:
    """The adapters' update ``B A * alpha / r`` of ``layer`` as an ``(out, in)`` float32 matrix."""
    base = layer.get_base_layer()
    return as_matrix(base, layer.get_delta_weight(ADAPTER)).float()


def merge_adapter(model: nn.Module, name: str, layer: LoraLayer) -> float:
    """Merge the adapters of the LoRA layer ``name`` into its base, re-projected onto the base's
    recorded mask and grid, and put the base back in its place (the adapters are gone).

    Returns:
        The share of the update the projection lost, ``||W + dW - proj(W + dW)||^2 / ||dW||^2``.
    """
    base = layer.get_base_layer()
    delta = adapter_update(layer)
    merged = weight_matrix(base).float() + delta
    target = project(merged, current_mask(base), current_grid(base))
    lost = (merged - target).pow(2).sum() / delta.pow(2).sum().clamp_min(1e-30)
    set_weight_matrix(base, target)
    replace_module(model, name, base)
    return lost.item()


def keep_adapter(layer: LoraLayer, entry: HistoryEntry) -> int:
    """Record on the base of ``layer`` that its adapters are kept (unmerged): ``entry`` with the
    edit :data:`LORA_ADAPTERS` (what replays them on a fresh model) and their weight count.

    Returns:
        How many weights the adapters hold.
    """
    count = adapter_weights(layer)
    record_stage(layer.get_base_layer(), {**entry, "edit": LORA_ADAPTERS, "adapter_weights": count})
    return count


def _entry_of(history: list[HistoryEntry]) -> HistoryEntry | None:
    return next((h for h in history if h.get("method") == LORA_METHOD), None)


def check_adapter_records(model: nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Refuse a state dict with LoRA adapters that ``model`` lacks and that were not kept by this
    framework's LoRAFineTune (their base layer carries no LoRAFineTune record, so nothing says
    how to rebuild them). Adapters ``model`` already has (a fit resumed while LoRA trains, or
    adapters a checkpoint written while LoRA trained has just re-injected:
    ``edits.training``) load as they are.

    Raises:
        PPQConfigError: naming the first such layer.
    """
    marker = ".lora_A."
    owners = sorted({key[len(prefix) :].split(marker)[0] for key in state_dict if marker in key})
    for owner in owners:
        if find_module(model, owner + BASE_SUFFIX) is not None:
            continue
        extra = state_dict.get(f"{prefix}{owner}{BASE_SUFFIX}.{STATE_NAME}._extra_state")
        history = extra.get("history", []) if isinstance(extra, dict) else []
        if _entry_of(history) is None:
            raise PPQConfigError(
                f"the state dict has LoRA adapters on {owner} but no LoRAFineTune record on its "
                "base layer and no record of a LoRAFineTune that was training when it was saved: "
                "it was not saved by this framework's LoRAFineTune stage (checkpoints written "
                "during fit by ppq-lightning before the fit record existed lack it too)."
            )


def replay_lora_adapter(model: nn.Module, owner: str, entry: HistoryEntry) -> None:
    """Inject into a fresh ``model`` the adapter that ``entry`` (recorded on the base layer
    ``owner``, ``...q_proj.base_layer``) kept, with the recorded rank, alpha and dropout.

    The adapter's initial values are drawn without touching the global random state (they are
    replaced by the state dict being loaded). Adapters are injected one layer at a time, so the
    model's ``peft_config`` ends up targeting every replayed layer, as one injection would.
    """
    target = owner[: -len(BASE_SUFFIX)] if owner.endswith(BASE_SUFFIX) else owner
    rows, cols = weight_matrix(model.get_submodule(target)).shape
    config = LoraConfig(
        r=recorded_size(owner, entry, "r", entry["r"], min(rows, cols)),
        lora_alpha=entry["alpha"],
        lora_dropout=entry["dropout"],
        target_modules=[target],
        bias="none",
    )
    previous = getattr(model, "peft_config", {}).get(ADAPTER)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if previous is not None:
        model.peft_config[ADAPTER].target_modules = {*previous.target_modules, target}
