"""Tiny Llama models whose layers hold the grid kinds of issue #29 (FP and K-quant grids).

Every projection's in-features are multiples of 256 (K-quant super-blocks) and every shape a
multiple of 128 (FP8 128 x 128 blocks), so any format fits any layer.
"""

from __future__ import annotations

import re

import torch

from ppq_lightning.compressed.state import record_grid, record_mask, record_stage
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.grid_formats import GridSpec

GRID_LLAMA = {
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def grid_lm(formats: str | dict[str, str | dict], sparsity: float = 0.0) -> CausalLMModule:
    """A tiny Llama (:data:`GRID_LLAMA`) whose projections are rounded to grid ``formats``.

    Args:
        formats: one format for every projection, or ``{regex: format}``, the first pattern
            that matches a layer's name choosing its format (layers matching none stay dense);
            a format is a name (``"nvfp4"``) or ``GridSpec.of``'s arguments
            (``{"format": "int", "bits": 4, "group_size": 32, "symmetric": True}``).
        sparsity: when positive, each layer's smallest weights are pruned first (magnitude,
            per layer), so that zeros meet the grid.
    """
    rules = {".": formats} if isinstance(formats, str) else formats
    module = CausalLMModule(model_config=GRID_LLAMA, seed=0)
    for name, layer in module.model.named_modules():
        if not name.endswith(PROJECTIONS):
            continue
        chosen = next((f for p, f in rules.items() if re.search(p, name)), None)
        if chosen is None:
            continue
        with torch.no_grad():
            if sparsity > 0:
                w = weight_matrix(layer).float()
                k = int(w.numel() * sparsity)
                threshold = w.abs().flatten().kthvalue(k).values
                record_mask(layer, w.abs() > threshold)
                record_stage(layer, {"stage": "P", "kind": "P", "sparsity": sparsity})
            spec = GridSpec.of(**chosen) if isinstance(chosen, dict) else GridSpec.of(chosen)
            grid, _ = spec.round_(weight_matrix(layer))
        record_grid(layer, grid)
        record_stage(layer, {"stage": "Q", "kind": "Q", "bits": grid.bits, "format": spec.format})
    return module
