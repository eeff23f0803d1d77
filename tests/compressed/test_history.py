"""Stage kinds and history entries (ppq_lightning.compressed.history)."""

import json

import pytest

from ppq_lightning.compressed.history import StageKind, kind_of


def test_stage_kind_values_are_the_letters_of_orders():
    assert {kind.name: kind.value for kind in StageKind} == {
        "PRUNE": "P",
        "QUANTIZE": "Q",
        "PRUNE_QUANTIZE": "PQ",
        "SHARE": "S",
        "LORA": "L",
        "NORMALIZATION": "N",
    }


@pytest.mark.parametrize(
    ("kind", "prunes", "quantizes"),
    [
        (StageKind.PRUNE, True, False),
        (StageKind.QUANTIZE, False, True),
        (StageKind.PRUNE_QUANTIZE, True, True),
        (StageKind.SHARE, False, False),
        (StageKind.LORA, False, False),
    ],
)
def test_stage_kind_prunes_and_quantizes(kind, prunes, quantizes):
    assert (kind.prunes, kind.quantizes) == (prunes, quantizes)


@pytest.mark.parametrize("kind", list(StageKind))
def test_stage_kind_reads_as_its_letter(kind):
    assert str(kind) == kind.value
    assert f"{kind}" == kind.value
    assert f"[{kind:>3}]" == f"[{kind.value:>3}]"
    assert json.dumps(kind) == f'"{kind.value}"'
    assert json.dumps({"kind": kind}) == f'{{"kind": "{kind.value}"}}'
    assert kind == kind.value  # a str enum: equal to its letter


def test_stage_kind_joins_into_an_order():
    assert ">".join([StageKind.PRUNE, StageKind.QUANTIZE]) == "P>Q"


@pytest.mark.parametrize("kind", list(StageKind))
def test_kind_of_an_entry_with_a_known_kind(kind):
    entry = {"stage": "s", "method": "M", "kind": kind.value}
    assert kind_of(entry) is kind
    assert kind_of({"kind": kind}) is kind  # already a StageKind


@pytest.mark.parametrize(
    "entry",
    [{}, {"stage": "s"}, {"kind": None}, {"kind": "X"}, {"kind": "p"}, {"kind": ""}, {"kind": 1}],
)
def test_kind_of_an_entry_without_a_known_kind_is_none(entry):
    assert kind_of(entry) is None


def test_kind_of_a_loaded_json_entry():
    entry = json.loads(json.dumps({"stage": "gptq", "kind": StageKind.PRUNE_QUANTIZE}))
    assert kind_of(entry) is StageKind.PRUNE_QUANTIZE
