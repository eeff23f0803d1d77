"""Shared builders of the compressed-state tests."""

from torch import nn

from ppq_lightning.compressed.state import record_grid, record_mask, record_stage
from ppq_lightning.ops.quant_grid import compute_grid


def quantized_pruned_linear() -> nn.Linear:
    layer = nn.Linear(16, 4)
    mask = layer.weight.abs() > layer.weight.abs().median()
    record_mask(layer, mask)
    record_stage(layer, {"stage": "P", "kind": "P", "sparsity": 0.5})
    grid = compute_grid(layer.weight.data, 4)
    layer.weight.data = grid.fake_quantize(layer.weight.data)
    record_grid(layer, grid)
    record_stage(layer, {"stage": "Q", "kind": "Q", "bits": 4})
    return layer
