import pytest
from torch import nn

from ppq_lightning.modules.tree import find_module, parent_of, replace_module


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(4, 4)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(4, 2)


def test_parent_of_returns_the_holding_module_and_attribute():
    model = _Net()
    parent, attribute = parent_of(model, "layers.0.mlp")
    assert parent is model.layers[0] and attribute == "mlp"


def test_parent_of_a_top_level_name_is_the_model_itself():
    model = _Net()
    parent, attribute = parent_of(model, "head")
    assert parent is model and attribute == "head"


def test_parent_of_a_name_that_does_not_exist_yet():
    model = _Net()
    parent, attribute = parent_of(model, "layers.1.new_child")
    assert parent is model.layers[1] and attribute == "new_child"


def test_parent_of_raises_when_the_parent_is_missing():
    with pytest.raises(AttributeError):
        parent_of(_Net(), "layers.0.attn.q_proj")


def test_replace_module_puts_the_new_module_at_a_nested_path():
    model = _Net()
    new = nn.Linear(4, 8)
    replace_module(model, "layers.1.mlp", new)
    assert model.layers[1].mlp is new
    assert model.get_submodule("layers.1.mlp") is new
    assert isinstance(model.layers[0].mlp, nn.Linear) and model.layers[0].mlp.out_features == 4


def test_replace_module_at_a_top_level_name_and_a_list_index():
    model = _Net()
    head, block = nn.Linear(4, 3), _Block()
    replace_module(model, "head", head)
    replace_module(model, "layers.0", block)
    assert model.head is head
    assert model.layers[0] is block and len(model.layers) == 2
    assert dict(model.named_children())["head"] is head


def test_find_module_returns_the_module_at_a_dotted_path():
    model = _Net()
    assert find_module(model, "layers.1.mlp") is model.layers[1].mlp
    assert find_module(model, "head") is model.head
    assert find_module(model, "") is model


@pytest.mark.parametrize("name", ["missing", "layers.0.attn", "layers.5", "head.weight.x"])
def test_find_module_returns_none_for_a_missing_path(name):
    assert find_module(_Net(), name) is None


def test_find_module_returns_none_for_a_parameter_path():
    assert find_module(_Net(), "head.weight") is None
