"""scripts/build_pydoc_cloze.py: which docstring paragraphs become cloze passages."""

import json

from tests.scripts.helpers import load_script

build_pydoc_cloze = load_script("build_pydoc_cloze")

PROSE = (
    "Return the number of items in the queue. The number is only approximate, because "
    "other threads may add or remove items while the size of the queue is being measured."
)


def _library(tmp_path, docstrings):
    library = tmp_path / "lib"
    (library / "test").mkdir(parents=True)
    body = "".join(f"def f{i}():\n    {json.dumps(d)}\n\n" for i, d in enumerate(docstrings))
    (library / "mod.py").write_text(body)
    (library / "test" / "test_mod.py").write_text(body)  # tests are skipped
    return library


def test_a_passage_is_prose_whose_last_word_occurs_before():
    assert build_pydoc_cloze.passage(PROSE) is None  # "measured" is new: not predictable
    assert build_pydoc_cloze.passage(PROSE.replace("measured.", "queue.")) == (
        PROSE.rsplit(" ", 1)[0],
        "queue",
    )


def test_code_short_text_and_new_words_are_not_passages():
    assert build_pydoc_cloze.passage(">>> " + PROSE) is None
    assert build_pydoc_cloze.passage(PROSE.replace("queue. The", "queue.\n    The")) is None
    assert build_pydoc_cloze.passage("Too short to be a passage about the queue.") is None
    assert build_pydoc_cloze.passage(PROSE.replace("measured.", "Queue.")) is None  # capital


def test_build_drops_duplicates_tests_and_text_shared_with_the_held_out_corpus(tmp_path):
    keep = PROSE.replace("measured.", "queue.")
    shared = keep.replace("Return the number", "Give the count")
    library = _library(tmp_path, [keep, keep, shared])
    rows = build_pydoc_cloze.build(library, held_out_text="")
    assert [r["source"] for r in rows] == ["mod.py", "mod.py"]  # not test/, one per passage
    rows = build_pydoc_cloze.build(library, held_out_text=" ".join(shared.split()[:10]))
    assert [r["context"][:6] for r in rows] == ["Return"]


def test_main_writes_the_two_splits(tmp_path, monkeypatch):
    keep = PROSE.replace("measured.", "queue.")
    library = _library(tmp_path, [keep.replace("Return", f"Return {i}") for i in range(5)])
    monkeypatch.setattr(build_pydoc_cloze.sysconfig, "get_paths", lambda: {"stdlib": library})
    build_pydoc_cloze.main(["--output", str(tmp_path / "out"), "--validation", "2"])
    out = tmp_path / "out"
    lines = {s: (out / f"{s}.jsonl").read_text().splitlines() for s in ("test", "validation")}
    assert len(lines["validation"]) == 2 and len(lines["test"]) == 3
    assert json.loads(lines["test"][0])["target"] == "queue"
