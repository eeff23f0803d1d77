"""LoRA adapters in the compressed state: the adapter name, and the replay of unmerged adapters.

``LoRAFineTune`` (``callbacks/lora.py``) injects peft adapters named :data:`ADAPTER`. A state
dict saved with unmerged adapters has ``...q_proj.lora_A.default.weight`` keys and the base layer
under ``...q_proj.base_layer``; :func:`replay_lora` re-injects the adapters into a fresh model
before such a state dict is loaded (called by ``state.enable_state_loading``'s hook).
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.state import STATE_NAME

ADAPTER = "default"


def replay_lora(model: nn.Module, names: list[str], state_dict: dict, prefix: str = "") -> None:
    """Inject the adapters of a checkpoint saved with unmerged LoRA adapters into ``model``
    (a fresh one) so that its state dict loads: the rank is read from the ``lora_A`` tensors,
    ``alpha`` and ``dropout`` from the ``LoRAFineTune`` entry recorded on the base layers.

    Raises:
        PPQConfigError: when the checkpoint's adapters disagree in rank or carry no record.
    """
    settings = set()
    for name in names:
        rank = state_dict[f"{prefix}{name}.lora_A.{ADAPTER}.weight"].shape[0]
        extra = state_dict.get(f"{prefix}{name}.base_layer.{STATE_NAME}._extra_state")
        history = extra.get("history", []) if isinstance(extra, dict) else []
        entry = next((h for h in history if h.get("method") == "LoRAFineTune"), None)
        if entry is None:
            raise PPQConfigError(
                f"the state dict has LoRA adapters on {name} but no LoRAFineTune record on its "
                "base layer: it was not saved by this framework's LoRAFineTune stage."
            )
        settings.add((rank, entry["alpha"], entry["dropout"]))
    if len(settings) != 1:
        raise PPQConfigError(
            f"the state dict's LoRA adapters disagree: (r, alpha, dropout) {settings}"
        )
    rank, alpha, dropout = settings.pop()
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(names), bias="none"
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
