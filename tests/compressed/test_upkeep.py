import torch
from torch import nn

from ppq_lightning.compressed.state import record_grid, record_mask
from ppq_lightning.compressed.upkeep import mask_gradients, project_onto_state
from ppq_lightning.modules.transforms import TRANSFORM_ATTRIBUTE
from ppq_lightning.ops.quant_grid import compute_grid


def compressed_linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    mask = torch.rand(4, 8) > 0.5
    record_mask(layer, mask)
    grid = compute_grid(layer.weight.detach(), 4, None, False)
    with torch.no_grad():
        layer.weight.copy_(grid.fake_quantize(layer.weight))
    record_grid(layer, grid)
    return layer


def test_mask_gradients_zeroes_pruned_entries_only():
    layer = compressed_linear()
    layer(torch.randn(3, 8)).sum().backward()
    mask = layer.ppq_state.mask
    assert mask_gradients(layer) == 1
    assert (layer.weight.grad[~mask] == 0).all() and (layer.weight.grad[mask] != 0).any()


def test_project_onto_state_restores_mask_and_grid():
    layer = compressed_linear()
    on_grid = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))  # an optimizer step
    assert project_onto_state(layer) == 1
    state = layer.ppq_state
    assert (layer.weight[~state.mask] == 0).all()
    assert state.grid.off_grid_distance(layer.weight).max() < 1e-5
    assert (layer.weight - on_grid).abs().max() <= state.scale.max()  # at most one step away


def test_frozen_and_transformed_layers_are_left_alone():
    frozen, transformed = compressed_linear(), compressed_linear()
    frozen.weight.requires_grad_(False)
    setattr(transformed, TRANSFORM_ATTRIBUTE, object())  # a QAT/CoDeQ stage owns its weights
    for layer in (frozen, transformed):
        with torch.no_grad():
            layer.weight.add_(0.01)
        drifted = layer.weight.detach().clone()
        assert project_onto_state(layer) == 0
        assert torch.equal(layer.weight, drifted)
