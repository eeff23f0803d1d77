"""Study cells (ppq_lightning.study.cells): the on-disk cache, its collision guard, and the
fingerprint of what a cell's value depends on."""

import copy
import json
from dataclasses import asdict, replace

import pytest
import torch
from torch import nn

from ppq_lightning.reports import write_json
from ppq_lightning.study.cells import Cell, CellCache, batch_bytes, fingerprint


def _cell(order="P>Q", keys=("prune-0", "quant-1"), value=12.5, metrics=None) -> Cell:
    return Cell(
        order=order,
        kind="order",
        keys=keys,
        value=value,
        M=-value,
        nominal_C=4.0,
        measured_C=3.9,
        sparsity=0.5,
        avg_bits=4.0,
        seconds=1.25,
        metrics=metrics or {},
    )


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _batches():
    return [torch.arange(6).reshape(2, 3), {"input_ids": torch.ones(2, 3, dtype=torch.long)}]


def test_cell_row_joins_the_keys():
    row = _cell().row()
    assert row == {
        "order": "P>Q",
        "kind": "order",
        "keys": "prune-0>quant-1",
        "value": 12.5,
        "M": -12.5,
        "nominal_C": 4.0,
        "measured_C": 3.9,
        "sparsity": 0.5,
        "avg_bits": 4.0,
        "seconds": 1.25,
        "eval_seconds": 0.0,
    }
    assert _cell(order="dense", keys=()).row()["keys"] == ""


def test_cell_row_has_a_column_per_reported_metric_and_old_cells_still_load(tmp_path):
    cell = _cell(metrics={"ppl": 12.5, "pydoc_cloze/acc": 0.25, "value": 1.0})
    row = cell.row()
    assert row["pydoc_cloze/acc"] == 0.25 and row["value"] == 12.5  # never shadows a field
    assert "metrics" not in row
    cache = CellCache(tmp_path, "abc")
    old = {k: v for k, v in asdict(_cell()).items() if k not in ("metrics", "eval_seconds")}
    write_json(cache.path(cell.keys), old)  # a cell written before metrics were kept
    loaded, from_disk = cache.get(cell.keys)
    assert from_disk and loaded.metrics == {} and loaded.eval_seconds == 0.0


def test_cell_cache_put_then_get_from_memory(tmp_path):
    cache, cell = CellCache(tmp_path, "abc"), _cell()
    assert cache.get(cell.keys) == (None, False)
    cache.put(cell)
    assert cache.path(cell.keys).exists()
    assert cache.get(cell.keys) == (cell, False)


def test_cell_cache_reads_a_new_caches_cells_from_disk(tmp_path):
    cell = _cell()
    CellCache(tmp_path, "abc").put(cell)
    fresh = CellCache(tmp_path, "abc")
    got, from_disk = fresh.get(cell.keys)
    assert got == cell and from_disk is True
    assert isinstance(got.keys, tuple)
    assert fresh.get(cell.keys) == (cell, False)  # remembered after the first read


def test_cell_cache_of_another_fingerprint_does_not_see_the_cell(tmp_path):
    cell = _cell()
    CellCache(tmp_path, "abc").put(cell)
    other = CellCache(tmp_path, "xyz")
    assert other.path(cell.keys) != CellCache(tmp_path, "abc").path(cell.keys)
    assert other.get(cell.keys) == (None, False)


def test_cell_cache_paths_differ_by_keys_and_lie_in_the_folder(tmp_path):
    cache = CellCache(tmp_path / "cells", "abc")
    first, second = cache.path(("a", "b")), cache.path(("b", "a"))
    assert first != second
    assert first.parent == tmp_path / "cells" and first.suffix == ".json"


def test_cell_cache_ignores_a_file_holding_another_cells_keys(tmp_path):
    cache, wanted, other = CellCache(tmp_path, "abc"), ("prune-0",), _cell()
    # simulate a hash collision: the file at wanted's path holds another cell
    cache.path(wanted).write_text(json.dumps({**other.row(), "keys": list(other.keys)}))
    assert cache.get(wanted) == (None, False)
    assert cache.get(other.keys) == (None, False)  # its own path holds nothing


def test_cell_cache_put_overwrites_a_cell(tmp_path):
    cache, cell = CellCache(tmp_path, "abc"), _cell()
    cache.put(cell)
    newer = replace(cell, value=13.0, M=-13.0)
    cache.put(newer)
    assert cache.get(cell.keys) == (newer, False)
    assert CellCache(tmp_path, "abc").get(cell.keys) == (newer, True)
    assert len(list(tmp_path.iterdir())) == 1


def test_fingerprint_is_stable_for_equal_weights_batches_and_metric():
    model = _model()
    reference = fingerprint(model, _batches(), "ppl")
    assert len(reference) == 16
    assert fingerprint(copy.deepcopy(model), _batches(), "ppl") == reference
    assert fingerprint(model, iter(_batches()), "ppl") == reference  # any iterable of batches


def test_fingerprint_changes_with_the_weights():
    model, changed = _model(), _model()
    before = fingerprint(model, _batches(), "ppl")
    with torch.no_grad():
        changed[0].weight[0, 0] += 0.5
    assert fingerprint(changed, _batches(), "ppl") != before
    assert fingerprint(_model(seed=1), _batches(), "ppl") != before


def test_fingerprint_changes_with_a_floating_buffer_but_not_an_integer_one():
    model = _model()
    before = fingerprint(model, _batches(), "ppl")
    model[1].num_batches_tracked += 3  # an integer buffer: not part of the fingerprint
    assert fingerprint(model, _batches(), "ppl") == before
    model[1].running_mean += 1.0
    assert fingerprint(model, _batches(), "ppl") != before


def test_fingerprint_changes_with_the_batches():
    model = _model()
    before = fingerprint(model, _batches(), "ppl")
    assert fingerprint(model, _batches()[:1], "ppl") != before
    changed = _batches()
    changed[1]["input_ids"][0, 0] = 2
    assert fingerprint(model, changed, "ppl") != before


def test_fingerprint_changes_with_the_metric():
    model = _model()
    assert fingerprint(model, _batches(), "ppl") != fingerprint(model, _batches(), "accuracy")


def test_batch_bytes_of_nested_batches():
    x = torch.arange(3, dtype=torch.int32)
    assert batch_bytes(x) == x.numpy().tobytes()
    assert batch_bytes([x, (x,)]) == 2 * x.numpy().tobytes()
    assert batch_bytes({"b": x, "a": 1}) == b"a" + b"1" + b"b" + x.numpy().tobytes()
    assert batch_bytes({"a": x}) != batch_bytes({"b": x})


@pytest.mark.parametrize("content", ['{"order": "P>', "{}", b"\xff\xfe"])
def test_a_corrupt_cell_file_is_named_in_a_warning_and_computed_again(tmp_path, content):
    cell = _cell()
    path = CellCache(tmp_path, "abc").path(cell.keys)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.warns(UserWarning, match=f"cell file {path} is unreadable"):
        assert CellCache(tmp_path, "abc").get(cell.keys) == (None, False)


def test_cells_of_version_one_keys_are_not_reused_and_said_so(tmp_path):
    from ppq_lightning.study.cells import Cell, CellCache

    old = Cell(
        "Q", "single", ("RTNQuantization{'name': 'Q', 'bits': 4}",), 9.0, -9.0, 4, 4, 0, 4, 1
    )
    CellCache(tmp_path, "f").put(old)
    cache = CellCache(tmp_path, "f")
    new_keys = ("RTNQuantization{'bits': 4, 'targets': None}",)
    with pytest.warns(UserWarning, match="1 cell file.*earlier ppq-lightning.*not reused"):
        assert cache.get(new_keys) == (None, False)
    assert cache.get(old.keys)[0] == old  # the file itself is intact, only never matched
