import pytest
import torch
from torch import nn

from ppq_lightning import InvariantError, check_invariants
from ppq_lightning.compressed.state import get_state
from tests.compressed.helpers import quantized_pruned_linear


def test_check_invariants_catches_revived_weight():
    model = nn.Sequential(quantized_pruned_linear())
    pruned = (~get_state(model[0]).mask).nonzero()[0]
    model[0].weight.data[tuple(pruned)] = get_state(model[0]).scale[pruned[0], 0]
    with pytest.raises(InvariantError, match=r"0: 1 pruned weight\(s\) are non-zero"):
        check_invariants(model)


def test_check_invariants_catches_off_grid_weight():
    model = nn.Sequential(quantized_pruned_linear())
    kept = get_state(model[0]).mask.nonzero()[0]
    model[0].weight.data[tuple(kept)] += 0.37 * get_state(model[0]).scale[kept[0], 0]
    with pytest.raises(InvariantError, match="off the 4-bit grid"):
        check_invariants(model)


def test_bfloat16_weights_pass_on_their_grid():
    layer = quantized_pruned_linear().to(torch.bfloat16)
    assert check_invariants(layer) == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_invariants_catches_non_finite_weights(value):
    model = nn.Sequential(quantized_pruned_linear())
    kept = get_state(model[0]).mask
    model[0].weight.data[1][kept[1]] = value  # the survivors of a row: pruned ones stay 0
    with pytest.raises(InvariantError, match=r"^0: \d+ weight\(s\) are NaN or infinite"):
        check_invariants(model)


def test_bfloat16_weight_one_unit_off_its_grid_value_is_caught():
    """A bf16 weight is on its grid only when it is the float32 grid value rounded once to
    bf16: one bf16 unit away is off (a tolerance of the dtype's epsilon let it pass)."""
    layer = quantized_pruned_linear().to(torch.bfloat16)
    grid = get_state(layer).grid
    w = layer.weight.data
    far = (w.float().abs() / grid.scale).argmax()  # the level farthest from zero
    row, col = divmod(int(far), w.shape[1])
    w[row, col] = torch.nextafter(w[row, col], torch.tensor(0.0, dtype=torch.bfloat16))
    with pytest.raises(InvariantError, match="1 weight\\(s\\) lie off the 4-bit grid"):
        check_invariants(layer)
