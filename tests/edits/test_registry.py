import functools
import re

import pytest
import torch
from torch import nn

from ppq_lightning.compressed.state import get_state, record_stage
from ppq_lightning.edits import registry
from ppq_lightning.edits.blocks import replay_block_removal
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.registry import Edit, edit_kind, register_edit, replay_entry
from ppq_lightning.errors import PPQConfigError

BASE = {"stage": "X", "method": "Method", "kind": "P"}
KIND = "resize_linear"


@pytest.fixture
def edits(monkeypatch):
    """A private copy of the edit table, so that no test leaves a kind registered."""
    table = dict(registry.EDITS)
    monkeypatch.setattr(registry, "EDITS", table)
    return table


def _resize_edit():
    """A custom edit: replace a Linear by a Linear of the recorded size (and remember calls)."""
    calls: list[tuple[str, dict]] = []

    def replay_resize(model: nn.Module, owner: str, entry: dict) -> None:
        calls.append((owner, entry))
        parent, _, attribute = owner.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, attribute, nn.Linear(entry["in_features"], entry["out_features"]))

    replay_resize.calls = calls
    return replay_resize


def _resized_source() -> nn.Sequential:
    """The model of :func:`_fresh` whose ``Linear(4, 8)`` was replaced by a ``Linear(4, 3)``,
    recorded as the edit ``KIND``."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Module())
    source[0].fc = nn.Linear(4, 3)
    record_stage(
        source[0].fc, {**BASE, "edit": KIND, "in_features": 4, "out_features": 3, "note": 1}
    )
    return source


def _fresh() -> nn.Sequential:
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Module())
    fresh[0].fc = nn.Linear(4, 8)
    return fresh


# -- edit_kind ------------------------------------------------------------------------------------
def test_edit_kind_returns_the_explicit_edit_key():
    assert edit_kind({**BASE, "edit": "my_kind"}) == "my_kind"
    assert edit_kind({**BASE, "edit": "my_kind", "kept_rows": [0], "shared_basis": {}}) == "my_kind"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"container": "layers", "removed": [1]}, "remove_blocks"),
        ({"kept_rows": [0, 2]}, "select_rows"),
        ({"kept_cols": [1]}, "select_columns"),
        ({"shared_basis": {"group": "g"}}, "shared_basis"),
        ({"method": "LoRAFineTune", "adapter_weights": 28}, "lora_adapters"),
    ],
)
def test_edit_kind_infers_legacy_entries_from_their_keys(keys, expected):
    assert edit_kind({**BASE, **keys}) == expected


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"sparsity": 0.5},
        {"container": "layers"},
        {"removed": [1]},
        {"method": "LoRAFineTune"},
        {"method": "OtherMethod", "adapter_weights": 28},
        {"original_weights": 48},
    ],
)
def test_edit_kind_of_an_entry_without_an_edit_is_none(keys):
    assert edit_kind({**BASE, **keys}) is None


def test_the_table_holds_the_built_in_edits():
    assert set(registry.EDITS) == {
        "remove_blocks",
        "select_rows",
        "select_columns",
        "shared_basis",
        "lora_adapters",
        "fold_batchnorm",
        "depgraph_channels",
    }
    assert registry.EDITS["remove_blocks"] == Edit(replay_block_removal, False)
    assert registry.EDITS["lora_adapters"].creates_owner
    assert not registry.EDITS["select_rows"].creates_owner


# -- register_edit --------------------------------------------------------------------------------
def test_a_registered_edit_is_replayed_when_a_fresh_model_loads_a_state_dict(edits):
    resize = _resize_edit()
    register_edit(KIND, resize)
    assert edits[KIND] == Edit(resize, False)
    source, fresh = _resized_source(), _fresh()
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict: the replay made the shapes agree
    assert [owner for owner, _ in resize.calls] == ["0.fc"]
    assert resize.calls[0][1]["note"] == 1
    assert fresh[0].fc.out_features == 3
    assert torch.equal(fresh[0].fc.weight, source[0].fc.weight)
    assert get_state(fresh[0].fc).history == get_state(source[0].fc).history


def test_registering_a_taken_kind_without_replace_raises(edits):
    with pytest.raises(PPQConfigError, match=r"edit kind 'select_rows' is already registered"):
        register_edit("select_rows", _resize_edit())
    assert edits["select_rows"] == registry.EDITS["select_rows"]


def test_registering_a_taken_kind_with_replace_replaces_it(edits):
    resize = _resize_edit()
    register_edit("select_rows", resize, replace=True)
    assert edits["select_rows"].replay is resize


def test_registering_the_same_edit_again_is_allowed(edits):
    resize = _resize_edit()
    register_edit(KIND, resize, creates_owner=True)
    register_edit(KIND, resize, creates_owner=True)
    assert edits[KIND] == Edit(resize, True)
    with pytest.raises(PPQConfigError, match=rf"edit kind '{KIND}' is already registered"):
        register_edit(KIND, resize)  # not the same edit: creates_owner differs


def test_registering_over_a_partial_replay_raises_a_config_error(edits):
    register_edit(KIND, functools.partial(_resize_edit()))
    with pytest.raises(PPQConfigError, match=rf"edit kind '{KIND}' is already registered"):
        register_edit(KIND, _resize_edit())


@pytest.mark.parametrize("kind", [3, None, "", ("a",)])
def test_registering_a_kind_that_is_not_a_non_empty_string_raises(edits, kind):
    with pytest.raises(PPQConfigError, match=re.escape(f"kind={kind!r} is not allowed")):
        register_edit(kind, _resize_edit())
    assert set(edits) == set(registry.EDITS)


# -- unknown and missing ---------------------------------------------------------------------------
def test_loading_a_state_dict_with_an_unknown_edit_kind_raises(edits):
    source, fresh = _resized_source(), _fresh()
    enable_state_loading(fresh)
    with pytest.raises(PPQConfigError, match=rf"0.fc: the state records the edit '{KIND}'"):
        fresh.load_state_dict(source.state_dict())


def test_replay_entry_of_an_unknown_kind_names_the_kind_and_stage(edits):
    with pytest.raises(PPQConfigError, match=r"edit 'vision_patch' of stage 'X'.*remove_blocks"):
        replay_entry(nn.Linear(2, 2), "", {**BASE, "edit": "vision_patch"})


def test_replay_entry_without_an_edit_does_nothing(edits):
    model = _fresh()
    replay_entry(model, "0.fc", {**BASE, "sparsity": 0.5})
    assert model[0].fc.out_features == 8


def test_an_edit_whose_owner_is_missing_is_skipped(edits):
    resize = _resize_edit()
    register_edit(KIND, resize)
    replay_entry(_fresh(), "0.gone", {**BASE, "edit": KIND}, exists=False)
    assert resize.calls == []


def test_an_edit_that_creates_its_owner_runs_when_the_owner_is_missing(edits):
    resize = _resize_edit()
    register_edit(KIND, resize, creates_owner=True)
    model = _fresh()
    entry = {**BASE, "edit": KIND, "in_features": 8, "out_features": 2}
    replay_entry(model, "0.head", entry, exists=False)
    assert resize.calls == [("0.head", entry)] and model[0].head.out_features == 2


def test_loading_skips_the_edit_of_a_missing_owner_unless_it_creates_it(edits):
    source = _fresh()
    source[0].head = nn.Linear(8, 2)
    record_stage(source[0].head, {**BASE, "edit": KIND, "in_features": 8, "out_features": 2})
    resize = _resize_edit()
    register_edit(KIND, resize)
    fresh = _fresh()
    enable_state_loading(fresh)
    result = fresh.load_state_dict(source.state_dict(), strict=False)
    assert resize.calls == []  # 0.head is not in the fresh model
    assert "0.head.weight" in result.unexpected_keys
    register_edit(KIND, resize, creates_owner=True, replace=True)
    fresh = _fresh()
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict: the replay created 0.head
    assert [owner for owner, _ in resize.calls] == ["0.head"]
    assert torch.equal(fresh[0].head.weight, source[0].head.weight)
