import pytest
import torch

from ppq_lightning.edits.channel_units import ChannelUnit
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.storage import SCALE_BITS
from ppq_lightning.order.joint_search import SearchSpace


def _space() -> SearchSpace:
    # one 4 x 8 layer; a unit that removes 2 of its rows at its second level
    none = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    unit = ChannelUnit(
        name="keep:a",
        channels=4,
        layers=[{"a": none}, {"a": (torch.tensor([0, 1]), torch.empty(0, dtype=torch.long))}],
        removed=[torch.empty(0, dtype=torch.long), torch.tensor([0, 1])],
        scores=torch.zeros(4),
    )
    return SearchSpace({"a": (4, 8)}, [unit], bits=[8, 4], keep=[1.0, 0.5])


def test_storage_of_levels_by_hand():
    space = _space()
    assert space.storage_bits({"a": 0, "keep:a": 0}) == 4 * 8 * 8 + 4 * (SCALE_BITS + 8)
    assert space.storage_bits({"a": 1, "keep:a": 1}) == 2 * 8 * 4 + 2 * (SCALE_BITS + 4)
    assert space.kept_shares({"a": 1, "keep:a": 1}) == {"a": 0.5}


def test_an_unreachable_budget_names_the_largest_c():
    space = _space()
    strongest = space.original_bits(16) / space.storage_bits(space.last_levels())
    space.check_reachable(strongest * 0.99, 16)
    with pytest.raises(PPQConfigError, match=rf"budget=.*at most about {strongest:.2f}"):
        space.check_reachable(strongest * 1.01, 16)
