"""The methods every grid kind shares (ops.grid.Grid), on a toy kind with three levels."""

from dataclasses import dataclass

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.float_grid import FloatGrid
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.kquants import KQuantGrid
from ppq_lightning.ops.quant_grid import QuantGrid

LEVELS = torch.tensor([0.0, 1.0, 1.0 + 2**-10])  # bf16 cannot tell the last two apart


@dataclass(frozen=True)
class Toy(Grid):
    def quantize(self, w):
        return (w.float()[..., None] - LEVELS).abs().argmin(-1).float()

    def dequantize(self, q):
        return LEVELS[q.long()]

    def neighbour(self, q, step):
        return torch.clamp(q + step, 0, len(LEVELS) - 1)


def test_a_16_bit_weight_reads_back_the_code_whose_rounded_value_it_is():
    grid = Toy()
    w = torch.tensor([[0.0, 1.0, 1.0 + 2**-10]])
    assert grid.codes(w).tolist() == [[0.0, 1.0, 2.0]]  # float32: the nearest
    held = grid.held(torch.tensor([[0.0, 2.0]]), torch.bfloat16)  # level 2 rounds to 1.0
    assert held.tolist() == [[0.0, 1.0]]
    assert grid.on_grid(held).all()
    assert not grid.on_grid(torch.tensor([[0.5]], dtype=torch.bfloat16)).any()
    with pytest.raises(PPQConfigError, match=r"w\.dtype"):
        grid.on_grid(w)


def test_every_kind_reads_codes_the_same_way():
    for kind in (QuantGrid, FloatGrid, KQuantGrid):
        assert kind.codes is Grid.codes and kind.on_grid is Grid.on_grid
        assert kind.neighbour is not Grid.neighbour
