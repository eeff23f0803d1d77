"""``format="peft"``: a compressed base model plus its unmerged LoRA adapters, as peft saves them.

The folder holds ``base/`` (the base model without adapters, a compressed-tensors export: the
adapters' base layers keep their masks and grids) and ``adapter/`` (``adapter_config.json`` and
``adapter_model.safetensors`` from peft's own ``get_peft_model_state_dict``), so that::

    base = load_pretrained("out/base")            # or transformers, for symmetric grids
    model = PeftModel.from_pretrained(base, "out/adapter")

rebuilds the fine-tuned model. A model whose adapters were merged (``merge="at_end"``) has no
adapters left: export it with ``format="compressed-tensors"``.

Adapters on an ``nn.MultiheadAttention``'s projections are refused (:func:`check`): its
``q_proj``/``k_proj``/``v_proj`` are views ppq-lightning installs (``modules.attention``), not
modules of the user's base model, so peft cannot target them there, and torch's attention reads
``out_proj.weight`` as a tensor, so a peft adapter on ``out_proj`` would never run. The native
format (``format="ppq"``) keeps such adapters and reloads them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.edits.lora import ADAPTER, BASE_SUFFIX, LORA_ADAPTERS, lora_layers
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import compressed_tensors
from ppq_lightning.export.architecture import describe, unwrap
from ppq_lightning.modules.attention import AttentionProjection, attention_of
from ppq_lightning.modules.tree import replace_module

BASE, ADAPTER_DIR = "base", "adapter"


def _without_adapters(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with every LoRA layer replaced by its base layer and the adapters'
    records dropped from the base layers' histories."""
    base = copy.deepcopy(network)
    for name, layer in lora_layers(base).items():
        replace_module(base, name, layer.get_base_layer())
    for _, _, state in compressed_modules(base):
        state.history = [e for e in state.history if e.get("edit") != LORA_ADAPTERS]
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


def check(model: nn.Module) -> None:
    """Refuse a model without adapters or with a base compressed-tensors cannot hold.

    Raises:
        PPQConfigError: naming what is wrong: no adapters, an adapter on a projection of an
            ``nn.MultiheadAttention`` (see the module docstring), or a base model that
            compressed-tensors refuses.
    """
    network = unwrap(model)
    layers = lora_layers(network)
    if not layers:
        raise PPQConfigError(
            "format='peft' needs unmerged LoRA adapters (LoRAFineTune(merge='never')); this model "
            "has none: export it with format='compressed-tensors'."
        )
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if attention_of(base) is None:
            continue
        reason = (
            "a view of the attention's in_proj_weight that ppq-lightning installs, not a module "
            "of the base model, so PeftModel.from_pretrained cannot target it"
            if isinstance(base, AttentionProjection)
            else "read by the attention's forward as a tensor, so a peft adapter on it would "
            "never run on the base model"
        )
        raise PPQConfigError(
            f"format='peft' cannot export the LoRA adapter on {name}: it is a projection of an "
            f"nn.MultiheadAttention, {reason}. Export with format='ppq', which keeps the "
            "adapters and reloads them (load_compressed)."
        )
    if describe(model)["kind"] != "transformers":
        raise PPQConfigError(
            f"format='peft' exports a transformers base model with its LoRA adapters, not "
            f"{type(network).__name__}; use format='ppq', which keeps the adapters of any model."
        )
    compressed_tensors.check(_without_adapters(network))


def save(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write ``base/`` and ``adapter/`` (see the module docstring)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    network = unwrap(model)
    (folder / BASE).mkdir()
    written = compressed_tensors.save(_without_adapters(network), folder / BASE)
    owner = network if hasattr(network, "peft_config") else model  # LoRAFineTune injects there
    config = copy.deepcopy(owner.peft_config[ADAPTER])
    config.target_modules = sorted(name for name in lora_layers(network))
    config.base_model_name_or_path = f"../{BASE}"
    previous = network.__dict__.get("peft_config")
    network.peft_config = {ADAPTER: config}  # what peft reads the adapters' layout from
    try:
        adapters = get_peft_model_state_dict(network, adapter_name=ADAPTER)
    finally:
        if previous is None:
            del network.peft_config
        else:
            network.peft_config = previous
    keys = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in adapters.items()}
    (folder / ADAPTER_DIR).mkdir()
    config.save_pretrained(str(folder / ADAPTER_DIR))
    save_file(keys, str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    layers = {name.removesuffix(BASE_SUFFIX) for name in lora_layers(network)}
    adapter_bytes = sum(t.numel() * t.element_size() for t in keys.values())
    written["layer_bytes"] = written["layer_bytes"] + adapter_bytes
    written["adapters"] = {"layers": len(layers), "bytes": adapter_bytes}
    return written
