"""Result files (ppq_lightning.reports): atomic writes and the CSV / JSON / Markdown tables."""

import json
import os

import pytest

from ppq_lightning import reports
from ppq_lightning.reports import markdown_table, write_json, write_table, write_text_atomic

ROWS = [{"a": 1, "b": 2.5}, {"c": "x", "a": 3}, {"b": None, "d": True}]


def test_write_text_atomic_creates_the_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "out.txt"
    assert write_text_atomic(path, "hello\n") == path
    assert path.read_text() == "hello\n"


def test_write_text_atomic_accepts_a_string_path_and_returns_a_path(tmp_path):
    written = write_text_atomic(str(tmp_path / "out.txt"), "x")
    assert written == tmp_path / "out.txt" and written.read_text() == "x"


def test_write_text_atomic_replaces_an_existing_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old contents that are longer")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_text_atomic_keeps_newlines_as_given(tmp_path):
    path = write_text_atomic(tmp_path / "out.csv", "a\r\nb\n")
    assert path.read_bytes() == b"a\r\nb\n"


def test_write_text_atomic_leaves_the_old_file_intact_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_text_atomic_removes_the_temporary_when_the_text_cannot_be_written(tmp_path):
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "out.txt", b"bytes are not text")
    assert list(tmp_path.iterdir()) == []


def test_write_json_writes_values_json_cannot_hold_as_strings(tmp_path):
    path = write_json(tmp_path / "data.json", {"path": tmp_path, "n": 1})
    assert json.loads(path.read_text()) == {"path": str(tmp_path), "n": 1}


def test_columns_are_in_order_of_first_appearance():
    assert reports.columns_of(ROWS) == ["a", "b", "c", "d"]


def test_write_table_writes_every_format_with_missing_values_empty(tmp_path):
    paths = write_table(ROWS, tmp_path / "results", "sweep")
    folder = tmp_path / "results"
    assert paths == {f: folder / f"sweep.{f}" for f in ("csv", "json", "md")}
    assert paths["csv"].read_bytes() == b"a,b,c,d\r\n1,2.5,,\r\n3,,x,\r\n,,,True\r\n"
    assert json.loads(paths["json"].read_text()) == ROWS
    assert paths["md"].read_text() == (
        "| a | b | c | d |\n"
        "|---|---|---|---|\n"
        "| 1 | 2.5 |  |  |\n"
        "| 3 |  | x |  |\n"
        "|  |  |  | True |\n"
    )


def test_write_table_writes_only_the_requested_formats(tmp_path):
    paths = write_table(ROWS, tmp_path, "studies", formats=("md", "csv"))
    assert set(paths) == {"md", "csv"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["studies.csv", "studies.md"]


def test_write_table_json_holds_json_data_when_given(tmp_path):
    data = {"rows": ROWS, "meta": {"seed": 0}}
    paths = write_table(ROWS, tmp_path, "schedule", json_data=data, formats=("json",))
    assert json.loads(paths["json"].read_text()) == data


def test_write_table_replaces_earlier_files(tmp_path):
    write_table(ROWS, tmp_path, "sweep", formats=("csv",))
    write_table([{"z": 0}], tmp_path, "sweep", formats=("csv",))
    assert (tmp_path / "sweep.csv").read_bytes() == b"z\r\n0\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (3.14159265, "3.142"),
        (2.0, "2"),
        (123456.0, "1.235e+05"),
        (0.000123456, "0.0001235"),
        (-0.5, "-0.5"),
        (12345, "12345"),  # integers are written in full
        (None, ""),
        ("text", "text"),
    ],
)
def test_markdown_table_writes_floats_to_four_significant_digits(value, cell):
    assert markdown_table([{"v": value}]).splitlines()[2] == f"| {cell} |"


def test_markdown_table_follows_given_columns():
    table = markdown_table([{"a": 1, "b": 2}], columns=["b", "missing"])
    assert table == "| b | missing |\n|---|---|\n| 2 |  |"
