import pytest
import torch
from torch import nn

from ppq_lightning.compressed.accounting import compression_summary, nominal_compression_rate
from ppq_lightning.compressed.state import record_grid, record_mask, record_stage
from ppq_lightning.ops.masks import nm_mask, unstructured_mask
from ppq_lightning.ops.quant_grid import compute_grid


def test_nominal_rates():
    assert nominal_compression_rate(0.5) == 2.0
    assert nominal_compression_rate(0.0, 4) == 4.0
    assert nominal_compression_rate(0.5, 4) == 8.0
    assert nominal_compression_rate(0.75, 8, b_orig=32) == 16.0


def test_uncompressed_model_has_unit_rates():
    s = compression_summary(nn.Linear(8, 8))
    assert s.n_layers == 0 and s.measured_C == 1.0 and s.nominal_C == 1.0


def test_quantized_layer_counts_values_scales_and_zeros():
    layer = nn.Linear(128, 4, bias=False)
    grid = compute_grid(layer.weight.data, 4, group_size=32)
    layer.weight.data = grid.fake_quantize(layer.weight.data)
    record_grid(layer, grid)
    record_stage(layer, {"stage": "q", "kind": "Q", "bits": 4})
    s = compression_summary(layer)
    stored = 512 * 4 + 16 * (16 + 4)  # values + per-group fp16 scale and 4-bit zero
    assert s.nominal_C == pytest.approx(4.0)
    assert s.measured_C == pytest.approx(16 * 512 / stored)
    assert s.avg_bits == 4


def test_pruned_quantized_layer_pays_for_its_mask():
    layer = nn.Linear(64, 8, bias=False)
    record_mask(layer, unstructured_mask(layer.weight.abs(), 0.5))
    record_stage(layer, {"stage": "p", "kind": "P", "sparsity": 0.5, "pattern": "unstructured"})
    grid = compute_grid(layer.weight.data, 4, symmetric=True)
    layer.weight.data = grid.fake_quantize(layer.weight.data)
    record_grid(layer, grid)
    record_stage(layer, {"stage": "q", "kind": "Q", "bits": 4})
    s = compression_summary(layer)
    nonzero = int((layer.weight != 0).sum())
    stored = nonzero * 4 + 512 + 8 * 16  # values, 1-bit mask, fp16 scale per row (symmetric)
    assert s.nominal_C == pytest.approx(8.0)
    assert s.measured_C == pytest.approx(16 * 512 / stored)
    assert s.sparsity == pytest.approx(1 - nonzero / 512)


def test_nm_index_overhead():
    layer = nn.Linear(64, 8, bias=False)
    record_mask(layer, nm_mask(layer.weight.abs(), 2, 4))
    record_stage(layer, {"stage": "p", "kind": "P", "sparsity": 0.5, "pattern": "2:4"})
    s = compression_summary(layer)
    assert s.measured_C == pytest.approx(16 * 512 / (256 * 16 + 256 * 2))
    assert s.nominal_C == pytest.approx(2.0)


def test_sparse_storage_only_when_smaller():
    layer = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        layer.weight[0, 0] = 0.0
    record_mask(layer, layer.weight != 0)
    record_stage(layer, {"stage": "p", "kind": "P", "sparsity": 0.0})
    assert compression_summary(layer).measured_C == pytest.approx(1.0)


def test_factors_count_as_the_original_weights_they_replace():
    # two (8, 32) layers replaced by a shared (4, 32) basis and two (8, 4) coefficient layers
    basis, coefficients = nn.Linear(32, 4, bias=False), [nn.Linear(4, 8) for _ in range(2)]
    record_stage(basis, {"stage": "s", "kind": "S", "original_weights": 0})
    for layer in coefficients:
        record_stage(layer, {"stage": "s", "kind": "S", "original_weights": 8 * 32})
    model = nn.ModuleList([basis, *coefficients, basis])  # the basis is counted once
    s = compression_summary(model)
    factors = 4 * (32 + 2 * 8)
    assert s.n_weights == 2 * 8 * 32
    assert s.nominal_C == pytest.approx(2 * 8 * 32 / factors)
    assert s.measured_C == pytest.approx(2 * 8 * 32 / factors)
    assert s.avg_bits == 16 and s.sparsity == 0
