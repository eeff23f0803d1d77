"""A stage finds the model's output layer and stem on its own data (calibration.boundary)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppq_lightning.calibration.boundary import trace_default_boundary
from ppq_lightning.modules.boundary import boundary_known
from ppq_lightning.modules.targets import resolve_targets


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_the_first_batch_of_the_stages_data_finds_the_boundary_once():
    model = _mlp()
    batches = [torch.randn(3, 4)]
    assert trace_default_boundary(model, None, dataloader=batches) == {"0": "stem", "4": "output"}
    assert list(resolve_targets(model)) == ["2"]
    assert trace_default_boundary(model, None, dataloader=batches) == {}  # traced already


def test_nothing_is_traced_with_targets_or_without_data():
    model = _mlp()
    assert trace_default_boundary(model, ["0"], dataloader=[torch.randn(3, 4)]) == {}
    assert trace_default_boundary(model, None) == {}  # no Trainer, no dataloader
    assert not boundary_known(model)
    assert list(resolve_targets(model)) == ["0", "2", "4"]


def test_a_forward_that_fails_on_the_batch_is_a_warning_naming_forward_fn():
    model = _mlp()
    with pytest.warns(UserWarning, match=r"and stem, failed \(RuntimeError.*forward_fn"):
        assert trace_default_boundary(model, None, dataloader=[torch.randn(3, 5)]) == {}
    assert not boundary_known(model)


def test_the_stages_forward_fn_calls_the_model():
    model = _mlp()
    batches = [{"features": torch.randn(3, 4)}]
    found = trace_default_boundary(
        model, None, dataloader=batches, forward=lambda m, b: m(b["features"])
    )
    assert found == {"0": "stem", "4": "output"}
