"""scripts/check_results.py: docs/results/README.md, README.md and docs/*.md agree with the
committed files, and a copy with one number changed (in the prose, a table or the data) does
not."""

import shutil

import pytest

from tests.scripts.helpers import load_script

check_results = load_script("check_results")
RESULTS = check_results.RESULTS
ROOT = check_results.ROOT
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


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
    assert "docs/results/README.md: 3 tables" in out
    assert f"{len(DOCUMENTS) + 1} documents against" in out and "; 0 mismatches;" in out


def test_readme_and_every_doc_are_checked_by_default(capsys):
    assert check_results.main([]) == 0, capsys.readouterr().err
    checked = {
        line.split(":")[0]: line for line in capsys.readouterr().out.splitlines() if ": " in line
    }
    for document in DOCUMENTS:
        assert document in checked, document
    for measured in ("README.md", "docs/benchmarks.md", "docs/joint_methods.md", "docs/vision.md"):
        assert " 0 marked numbers" not in checked[measured], measured


def _copy_doc(tmp_path, name):
    """A copy of one document (README.md or docs/x.md) to break; its paths still resolve."""
    copy = tmp_path / name.replace("/", "_")
    copy.write_text((ROOT / name).read_text())
    return copy


def test_a_changed_number_in_a_copy_of_the_readme_fails_naming_it(tmp_path, capsys):
    readme = _copy_doc(tmp_path, "README.md")
    assert check_results.main([str(readme)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    _replace(readme, "ppl 21.6<!--", "ppl 20.6<!--")  # the joint search's row of the methods table
    assert check_results.main([str(readme)]) == 1
    err = capsys.readouterr().err
    line = 1 + readme.read_text()[: readme.read_text().index("ppl 20.6<!--")].count("\n")
    assert f"{readme}:{line}: joint('smollm2', 'ppl', 'joint (budget C=4.89)'): " in err
    assert "expected 21.5942, written 20.6" in err
    assert err.count("\n") == 1


def test_a_changed_cell_of_an_unmarked_table_in_the_readme_fails(tmp_path, capsys):
    readme = _copy_doc(tmp_path, "README.md")
    _replace(readme, "| 619.2<!--", "| 609.2<!--")  # the demo pairs, from the committed grid
    assert check_results.main([str(readme)]) == 1
    err = capsys.readouterr().err
    assert "g('P50_Q4', 'order[Q4>P50]'): expected 619.154, written 609.2" in err


def test_a_changed_number_in_a_copy_of_a_doc_fails_naming_it(tmp_path, capsys):
    doc = _copy_doc(tmp_path, "docs/joint_methods.md")
    _replace(doc, "**21.59<!--", "**19.59<!--")
    _replace(doc, "within 3<!--", "within 2<!--")
    assert check_results.main([str(doc)]) == 1
    err = capsys.readouterr().err
    assert f"{doc}:" in err
    assert "lm('ppl', lm_joint): expected 21.5942, written 19.59" in err
    assert "expected 2.94999, written 2" in err
    assert err.count("\n") == 2


def test_changed_data_fails_in_every_document_that_uses_it(copy, capsys):
    variants = copy / "joint_vs_sequential_smollm2" / "variants.csv"
    _replace(variants, ",21.59419822692871,", ",22.59419822692871,")
    assert check_results.main(["--results", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "README.md:" in err and "docs/joint_methods.md:" in err
    assert "expected 22.5942, written 21.6" in err and "expected 22.5942, written 21.59" in err
    assert "docs/results/README.md" not in err and f"{copy}/README.md" not in err


def test_a_marker_that_cannot_be_evaluated_fails(tmp_path, capsys):
    doc = _copy_doc(tmp_path, "docs/vision.md")
    _replace(doc, "2.9<!-- = size(", "2.9<!-- = sizes(")
    _replace(
        doc, "fashion_mnist_resnet18.json', 'test_acc')", "fashion_mnist_resnet18.json', 'acc')"
    )
    assert check_results.main([str(doc)]) == 1
    err = capsys.readouterr().err
    assert "NameError: name 'sizes' is not defined" in err
    assert "expected a value, written" in err and "no 'acc'" in err


def test_paths_in_docs_must_exist_and_patterns_must_match(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "See `docs/benchmarks.md`, `configs/sweeps/*.yaml`, `tests/ops/test_<name>.py`,\n"
        "`ppq_lightning/callbacks/registry.py` and `ppq_lightning/models/lm_tasks.py::X`.\n"
    )
    assert check_results.main([str(doc)]) == 0, capsys.readouterr().err
    doc.write_text("See `docs/no_such.md` and `configs/sweeps/*.toml`.\n")
    assert check_results.main([str(doc)]) == 1
    err = capsys.readouterr().err
    assert "expected an existing path, written docs/no_such.md" in err
    assert "written configs/sweeps/*.toml" in err


def test_unmarked_tables_of_a_doc_are_settings_but_strict_lists_their_numbers(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("| bits | group |\n|---|---|\n| 4 | 128 |\n")
    assert check_results.main([str(doc)]) == 0, capsys.readouterr().err
    assert check_results.main(["--strict", str(doc)]) == 1
    err = capsys.readouterr().err
    assert f"{doc}:3: prose: expected a <!-- = EXPR --> marker, written 4" in err
    assert "written 128" in err


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
