import csv
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.report import read_results, write_report
from ppq_lightning.study.result import StudyResult


def _study(tiny_lm, tiny_data, folder, sparsity=0.5, **options):
    stages = [MagnitudePruning(sparsity=sparsity, name="P"), RTNQuantization(bits=4, name="Q")]
    return OrderStudy(tiny_lm, tiny_data, stages, output_dir=folder, **options)


def _rows(folder):
    with open(folder / "studies.csv") as f:
        return list(csv.DictReader(f))


def test_a_second_study_in_the_folder_keeps_the_first_ones_row(tmp_path, tiny_lm, tiny_data):
    """A second study in the same output folder dropped the first one's row."""
    first = _study(tiny_lm, tiny_data, tmp_path, label="a").run()
    second = _study(tiny_lm, tiny_data, tmp_path, sparsity=0.75, label="b").run()
    write_report([first], tmp_path, merge=True)
    write_report([second], tmp_path, merge=True)
    assert [r["study"] for r in _rows(tmp_path)] == ["a", "b"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["study"] for c in report["cells"]].count("a") == len(first.cells())
    assert report["pih_hits"]["studies"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["latest"] == [second.key]
    # the same study again (relabelled: a label is not part of the key) replaces its row in place
    again = _study(tiny_lm, tiny_data, tmp_path, label="a2").run()
    assert again.key == first.key and again.budget.cached == len(first.cells())
    write_report([again], tmp_path, merge=True)
    assert [r["study"] for r in _rows(tmp_path)] == ["a2", "b"]
    # without merge the report holds the studies given, as before
    write_report([second], tmp_path)
    assert [r["study"] for r in _rows(tmp_path)] == ["b"]


def test_the_study_key_is_what_changes_the_row(tmp_path, tiny_lm, tiny_data):
    key = _study(tiny_lm, tiny_data, tmp_path).study_key()
    assert _study(tiny_lm, tiny_data, tmp_path, label="x").study_key() == key
    others = [
        _study(tiny_lm, tiny_data, tmp_path, sparsity=0.6),
        _study(tiny_lm, tiny_data, tmp_path, search="pih"),
        _study(tiny_lm, tiny_data, tmp_path, order="Q>P"),
        _study(tiny_lm, tiny_data, tmp_path, metric="loss"),
        _study(tiny_lm, tiny_data, tmp_path, curve=[RTNQuantization(bits=8, name="R8")]),
    ]
    assert len({key, *(study.study_key() for study in others)}) == 1 + len(others)


def test_results_read_back_whole(tmp_path, tiny_lm, tiny_data):
    curve = [RTNQuantization(bits=8, name="R8"), RTNQuantization(bits=2, name="R2")]
    result = _study(tiny_lm, tiny_data, tmp_path, curve=curve).run()
    write_report([result], tmp_path)
    (read,) = read_results(tmp_path)
    assert read == result and isinstance(read, StudyResult)
    assert read.orders["P>Q"].keys == result.orders["P>Q"].keys  # tuples again


def test_a_report_without_study_records_is_named_and_replaced(tmp_path, tiny_lm, tiny_data):
    result = _study(tiny_lm, tiny_data, tmp_path).run()
    (tmp_path / "report.json").write_text(json.dumps({"studies": [{"study": "old"}]}))
    with pytest.warns(UserWarning, match=r"cannot be read back .*earlier ppq-lightning wrote no"):
        write_report([result], tmp_path, merge=True)
    assert [r["study"] for r in _rows(tmp_path)] == [result.label]


def test_studies_finishing_at_once_all_keep_their_rows(tmp_path, tiny_lm, tiny_data):
    result = _study(tiny_lm, tiny_data, tmp_path).run()
    results = [dataclasses.replace(result, label=f"s{i}", key=f"k{i}") for i in range(6)]
    with ThreadPoolExecutor(len(results)) as pool:
        list(pool.map(lambda r: write_report([r], tmp_path / "report", merge=True), results))
    assert sorted(r["study"] for r in _rows(tmp_path / "report")) == [r.label for r in results]
