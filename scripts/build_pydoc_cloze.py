"""Build ``pydoc_cloze``: a LAMBADA-style last-word cloze task over CPython's docstrings.

LAMBADA asks a model for the last word of a passage whose context makes that word
predictable. ``pydoc_cloze`` does the same on English prose that ships with CPython and that
no other part of the project reads: the docstrings of the standard library's modules, classes
and functions (parsed with ``ast``, nothing is imported). ``TextDataModule(source="pydoc")``
calibrates, trains and evaluates perplexity on ``pydoc_data/topics.py`` instead, and every
passage that shares an 8-word run with that file is dropped, so the task is held out from
calibration and fine-tuning data.

A passage is one docstring paragraph that:

- is prose: no indented (code) line, no ``>>>`` prompt;
- has 20 to 200 words (whitespace collapsed);
- ends with a lowercase alphabetic word of 4+ letters followed by a full stop, and that word
  occurs earlier in the passage (LAMBADA's selection kept passages whose target is
  predictable from the context; repetition is the measurable part of that, as in its
  "target word in context" statistics).

The target is the word and the context the passage before it (the full stop dropped); the
task joins them with one space.
Passages are de-duplicated, shuffled with a fixed seed and split: ``--validation`` passages
for few-shot examples, the rest the test split. The output is two JSON-lines files beside the
task's YAML (``ppq_lightning/models/assets/lm_tasks/pydoc_cloze/``); the files in the
repository were built with CPython 3.11, and another CPython version builds a different set.

    python scripts/build_pydoc_cloze.py                     # rewrite the shipped task data
    python scripts/build_pydoc_cloze.py --output /tmp/cloze # somewhere else
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ppq_lightning.models.lm_tasks import LOCAL_TASKS
from ppq_lightning.reports import write_text_atomic

SKIPPED_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo"}
SHINGLE = 8  # words in a run shared with topics.py that disqualifies a passage
_TARGET = re.compile(r"([a-z]{4,})\.")


def _words(text: str) -> list[str]:
    return text.split()


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    lowered = [w.lower() for w in words]
    return {tuple(lowered[i : i + SHINGLE]) for i in range(len(lowered) - SHINGLE + 1)}


def docstrings(library: Path) -> Iterator[tuple[str, str]]:
    """``(relative file, docstring)`` of every module, class and function of ``library``."""
    files = sorted(library.rglob("*.py"))
    for path in files:
        relative = path.relative_to(library)
        if SKIPPED_PARTS & set(relative.parts) or "__pycache__" in relative.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield str(relative), doc


def passage(paragraph: str) -> tuple[str, str] | None:
    """``(context, target)`` of a docstring paragraph, or None when it does not qualify."""
    lines = paragraph.split("\n")
    if ">>>" in paragraph or any(line.startswith((" ", "\t")) for line in lines):
        return None
    words = _words(paragraph)
    if not 20 <= len(words) <= 200:
        return None
    match = _TARGET.fullmatch(words[-1])
    if match is None:
        return None
    target = match.group(1)
    earlier = {w.strip(".,;:()\"'`").lower() for w in words[:-1]}
    if target not in earlier:
        return None
    return " ".join(words[:-1]), target


def build(library: Path, held_out_text: str) -> list[dict[str, str]]:
    """Every qualifying passage of ``library``'s docstrings that shares no 8-word run with
    ``held_out_text``, de-duplicated, in file order."""
    excluded = _shingles(_words(held_out_text))
    rows, seen = [], set()
    for source, doc in docstrings(library):
        for paragraph in re.split(r"\n\s*\n", doc):
            found = passage(paragraph)
            if found is None or found in seen:
                continue
            context, target = found
            if _shingles([*_words(context), target]) & excluded:
                continue
            seen.add(found)
            rows.append({"context": context, "target": target, "source": source})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=LOCAL_TASKS / "pydoc_cloze")
    parser.add_argument("--validation", type=int, default=50, help="few-shot passages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from pydoc_data.topics import topics

    rows = build(Path(sysconfig.get_paths()["stdlib"]), "\n\n".join(topics.values()))
    if len(rows) <= args.validation:
        raise SystemExit(f"only {len(rows)} passages qualify; --validation={args.validation}")
    random.Random(args.seed).shuffle(rows)
    splits = {"validation": rows[: args.validation], "test": rows[args.validation :]}
    for split, part in splits.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
        write_text_atomic(args.output / f"{split}.jsonl", lines)
        print(f"{split}: {len(part)} passages -> {args.output / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
