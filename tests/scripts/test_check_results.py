"""scripts/check_results.py: docs/results/README.md agrees with the committed files, and a copy
with one number changed (in the prose, a table or the data) does not."""

import shutil

import pytest

from tests.scripts.helpers import load_script

check_results = load_script("check_results")
RESULTS = check_results.RESULTS


@pytest.fixture
def copy(tmp_path):
    """A copy of docs/results (the README and every result file) to break."""
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder, ignore=shutil.ignore_patterns("cells", "*.png"))
    return folder


def _replace(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_the_committed_results_readme_matches_its_data(capsys):
    assert check_results.main([]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "0 mismatches" in out and "3 tables" in out


def test_the_copy_passes_before_it_is_changed(copy, capsys):
    assert check_results.main(["--results", str(copy)]) == 0, capsys.readouterr().err


def test_a_changed_number_in_prose_fails_naming_it(copy, capsys):
    _replace(copy / "README.md", "GPTQ-4\nis 15.4<!--", "GPTQ-4\nis 18.0<!--")
    assert check_results.main(["--results", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "vm('gptq4', 'x_floor'): expected 15.3794, written 18.0" in err
    assert err.count("\n") == 1  # that one number, nothing else


def test_a_changed_table_cell_fails_naming_row_and_column(copy, capsys):
    _replace(copy / "README.md", "| +22.9 (P50, Q3) |", "| +12.9 (P50, Q3) |")
    assert check_results.main(["--results", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "`vision_grid_wanda_rtn` column 'largest A (points)': expected +22.9 (P50, Q3)" in err
    assert "written +12.9 (P50, Q3)" in err


def test_changed_data_fails_where_the_readme_uses_it(copy, capsys):
    summary = copy / "order_grid_wanda_rtn" / "summary.json"
    _replace(summary, '"p_first_wins": 17,', '"p_first_wins": 16,')
    assert check_results.main(["--results", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "wandasum('p_first_wins'): expected 16, written 17" in err


def test_a_table_without_a_derived_marker_fails_naming_it(copy, capsys):
    _replace(copy / "README.md", "<!-- derived: vision_grids -->\n", "")
    assert check_results.main(["--results", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "table | grid | PIH right | prune-first wins | largest A (points) |" in err
    assert "expected a <!-- derived: KIND --> marker" in err


def test_an_unknown_table_kind_and_a_missing_folder_fail(copy, capsys):
    readme = copy / "README.md"
    _replace(readme, "<!-- derived: prediction -->", "<!-- derived: guesswork -->")
    shutil.rmtree(copy / "split_pruning")
    assert check_results.main(["--results", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "written 'guesswork'" in err
    assert "no file split_pruning/split_pruning.json" in err  # a marker that reads it
    assert "expected an existing folder, written split_pruning/" in err


def test_numbers_are_read_to_the_digits_written():
    assert check_results.agrees("0.22", 0.2246) and not check_results.agrees("0.21", 0.2246)
    assert check_results.agrees("1.1e4", 11410.0) and not check_results.agrees("1.2e4", 11410.0)
    assert check_results.agrees("45", 45.07) and not check_results.agrees("44", 45.07)
    assert check_results.agrees("six", 6) and not check_results.agrees("7", 6)  # counts: exact
    assert check_results.agrees("17/39", "17/39") and check_results.agrees("3/4", (3, 4))
    assert not check_results.agrees("4", float("inf"))


def test_strict_lists_unmarked_numbers(copy, capsys):
    assert check_results.main(["--results", str(copy), "--strict"]) == 1
    assert "prose: expected a <!-- = EXPR --> marker, written 512" in capsys.readouterr().err
