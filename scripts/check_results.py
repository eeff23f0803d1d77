"""Check that the documentation says what the committed result files say.

The documents are docs/results/README.md (the index of the results), README.md and every
docs/*.md. Every derived table and every marked number of them is re-derived from the CSV/JSON
files that the experiment scripts wrote under ``docs/results/*/``; the data wins. Exit status 1
names every mismatch (document and line, the file or expression it was derived from, expected
against written); 0 when everything checked agrees. Nothing is re-run: only committed files are
read, with the standard library, so the check is fast enough for every test run.

What a document marks (HTML comments, invisible when rendered):

- a table is preceded (last non-blank line before it) by ``<!-- derived: KIND -->``; the
  checker knows the kinds in :data:`TABLES`. In the results index every table needs one: a
  table without a marker, or with a kind it does not know, is a failure that names the table.
  In the other documents an unmarked table is one of settings or definitions and is not
  checked as a table (its numbers may carry ``<!-- = EXPR -->`` markers, and ``--strict``
  lists the ones that do not). ``folders`` (the index): every folder a row names exists
  (``<x>`` and ``[x]`` are patterns) and every result folder is named by a row. The keyed kinds
  (``vision_grids``, ``prediction``) find each row's data by the name in backticks in its first
  cell (a folder, a grid, or a folder for its ``all`` row); the rest of that cell is a label
  and is not checked. Every other cell is re-derived and compared, and the header must be the
  kind's header.
- a number in prose or in a table cell is followed at once by ``<!-- = EXPR -->``:
  ``0.22<!-- = val(...) -->`` s. ``EXPR`` is a Python expression over the helpers of
  :func:`namespace` (``val``, ``cell``, ``col``, ``rows``, ``metric``, ``frac``, ``mean``, ...;
  ``repo`` and ``size`` for the few results a committed script wrote elsewhere in the
  repository, such as the shipped model's record) and the names of earlier
  ``<!-- let NAME = EXPR -->`` markers of the same document; file paths are relative to
  ``docs/results``. A marker that cannot be evaluated (unknown name, missing file or row) fails.
- every backticked repository path (``configs/...``, ``scripts/...``, ``docs/...``, ``tests/...``,
  ``ppq_lightning/...``, with ``{a,b}`` alternatives; ``*`` and ``<name>`` as wildcards) must
  exist.

How a written number is compared: it must be the expected value rounded to the digits written
(``0.22`` matches 0.2246, ``1.1e4`` matches 11410, ``45`` matches 45.07); counts (ints) must be
equal. Non-numeric text in a derived cell must be equal.

What it does not check: numbers without a marker (``--strict`` lists them: in the other
documents most are settings, such as bit widths, sparsities and windows, which are not
measurements), the labels in the first cell of keyed tables, the script and question columns of
the index beyond their paths and marked numbers, text cells of unmarked tables, the wording of
claims around the checked numbers, plots (``*.png``), the folders' own README.md files, and
whether the committed files themselves are right (they are the reference; most record their
command, and only runs made after the writers learnt it their git commit).

    python scripts/check_results.py                 # the index, README.md, docs/*.md
    python scripts/check_results.py README.md       # only these documents
    python scripts/check_results.py --results DIR   # against another copy (DIR/README.md too)
    python scripts/check_results.py --strict        # also fail on unmarked numbers
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"

NUMBER = r"[+\-\u2212]?\d+(?:\.\d+)?(?:e[+\-]?\d+)?"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WRITTEN = (  # in prose: a sign only after a space or "(" ("0.003-0.36" is a range), a/b, words
    r"(?:(?<![^\s(\[])[+\-\u2212])?\d+(?:\.\d+)?(?:e[+\-]?\d+)?(?:/\d+)?"
    rf"|\b(?:{'|'.join(WORDS)})"
)
MARKER = re.compile(r"<!--\s*(derived:|let\s+\w+\s*=|=)\s*(.*?)\s*-->", re.S)
INLINE = re.compile(rf"({WRITTEN})<!--\s*=\s*(.*?)\s*-->", re.S | re.I)
PROSE_NUMBER = re.compile(rf"(?<![\w.\-\u2212/`\[])({NUMBER})(?![\w/\]])")
REPO_PATH = re.compile(r"`((?:configs|scripts|docs|tests|ppq_lightning)/[^`\s]+)[^`]*`")


class Mismatch(NamedTuple):
    """One disagreement: where (document and line), what it was derived from, expected vs
    written."""

    line: int
    source: str
    expected: str
    written: str
    doc: str = "README.md"

    def __str__(self) -> str:
        where = f"{self.doc}:{self.line}: {self.source}"
        return f"{where}: expected {self.expected}, written {self.written}"


class CheckError(Exception):
    """A marker the checker cannot evaluate (bad expression, missing file or row)."""


# --- reading the committed files ------------------------------------------------------------


def _value(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


class Files:
    """The committed result files of one ``docs/results`` folder, read once each."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self._cache: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        path = self.results / name
        if not path.is_file():
            raise CheckError(f"no file {name} under {self.results}")
        return path

    def json(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = json.loads(self.path(name).read_text())
        return self._cache[name]

    def repository_json(self, name: str) -> Any:
        """A JSON file committed outside ``docs/results`` (a path from the repository root)."""
        key = f"repository:{name}"
        if key not in self._cache:
            path = ROOT / name
            if not path.is_file():
                raise CheckError(f"no file {name} in the repository")
            self._cache[key] = json.loads(path.read_text())
        return self._cache[key]

    def csv(self, name: str) -> list[dict[str, Any]]:
        if name not in self._cache:
            with self.path(name).open(newline="") as f:
                self._cache[name] = [
                    {k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)
                ]
        return self._cache[name]


def namespace(files: Files) -> dict[str, Any]:
    """The names a marker's expression may use (no builtins beyond these)."""

    def rows(name: str, **where: Any) -> list[dict[str, Any]]:
        """The rows of a CSV file whose columns equal ``where``."""
        found = files.csv(name)
        for key, want in where.items():
            found = [r for r in found if r.get(key) == want]
        return found

    def cell(name: str, column: str, **where: Any) -> Any:
        """The one value of ``column`` in the row of a CSV file that ``where`` selects."""
        found = rows(name, **where)
        if len(found) != 1:
            raise CheckError(f"{name} {where}: {len(found)} rows, expected 1")
        if column not in found[0]:
            raise CheckError(f"{name}: no column {column!r}")
        return found[0][column]

    def col(name: str, column: str, **where: Any) -> list[Any]:
        """The non-empty values of ``column`` over the rows ``where`` selects."""
        return [r[column] for r in rows(name, **where) if r.get(column) is not None]

    def val(name: str, *keys: Any) -> Any:
        """A value of a JSON file: ``val("x/summary.json", "seconds")``; a list of objects is
        indexed by an int or by ``"field=value"``."""
        return walk(name, files.json(name), keys)

    def repo(name: str, *keys: Any) -> Any:
        """A value of a JSON file that a committed script wrote elsewhere in the repository,
        as :func:`val` (the shipped model's record: ``repo("ppq_lightning/models/assets/
        fashion_mnist_resnet18.json", "test_acc")``)."""
        return walk(name, files.repository_json(name), keys)

    def size(name: str) -> int:
        """The bytes of a file committed in the repository (a path from its root)."""
        path = ROOT / name
        if not path.is_file():
            raise CheckError(f"no file {name} in the repository")
        return path.stat().st_size

    def walk(name: str, value: Any, keys: tuple[Any, ...]) -> Any:
        for key in keys:
            if isinstance(key, str) and "=" in key and isinstance(value, list):
                wanted = [condition.split("=", 1) for condition in key.split("&")]
                value = [v for v in value if all(str(v.get(f)) == w for f, w in wanted)]
                if len(value) != 1:
                    raise CheckError(f"{name}: {len(value)} entries with {key}")
                value = value[0]
            else:
                try:
                    value = value[key]
                except (KeyError, IndexError, TypeError) as error:
                    raise CheckError(f"{name}: no {key!r} in {keys}") from error
        return value

    def metric(folder: str, order: str) -> float:
        """The metric of one evaluated order (``"dense"``, ``"P50"``, ``"P50>Q4"``) of a study
        folder, from its ``cells.csv`` (a cell shared by several studies must agree)."""
        values = {r["value"] for r in files.csv(f"{folder}/cells.csv") if r["order"] == order}
        if len(values) != 1:
            raise CheckError(f"{folder}/cells.csv: {len(values)} values for order {order!r}")
        return values.pop()

    def frac(text: str) -> tuple[int, int]:
        """``"17/39"`` -> ``(17, 39)``."""
        right, total = str(text).split("/")
        return int(right), int(total)

    return {
        "rows": rows,
        "cell": cell,
        "col": col,
        "val": val,
        "repo": repo,
        "size": size,
        "frac": frac,
        "metric": metric,
        "mean": statistics.fmean,
        "stdev": statistics.stdev,
        "min": min,
        "max": max,
        "sum": sum,
        "len": len,
        "abs": abs,
        "round": round,
        "int": int,
        "float": float,
        "sorted": sorted,
        "any": any,
        "all": all,
        "math": math,
    }


def evaluate(expression: str, names: dict[str, Any]) -> Any:
    try:
        # names as globals, so that comprehensions and lambdas in a marker see them too
        return eval(expression, {"__builtins__": {}, **names})  # the repository's own docs
    except CheckError:
        raise
    except Exception as error:  # a typo in a marker is a failure too, named with its text
        raise CheckError(f"{expression}: {type(error).__name__}: {error}") from error


# --- comparing written numbers ----------------------------------------------------------------


def parse_number(text: str) -> float:
    if text.lower() in WORDS:
        return float(WORDS.index(text.lower()))
    return float(text.replace("\u2212", "-"))


def tolerance(text: str) -> float:
    """Half a unit of the last digit written: ``0.22`` -> 0.005, ``1.1e4`` -> 500."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def agrees(written: str, expected: Any) -> bool:
    """Whether a written number is ``expected`` rounded to the digits written."""
    if isinstance(expected, bool) or expected is None:
        return False
    if "/" in written:  # a count out of a total: "17/39", against "17/39" or (17, 39)
        if isinstance(expected, tuple):
            expected = "/".join(str(v) for v in expected)
        return written == expected
    if isinstance(expected, str):
        return False
    value = parse_number(written)
    if isinstance(expected, int):
        return value == expected
    if not math.isfinite(expected):
        return False
    return abs(value - expected) <= tolerance(written) * (1 + 1e-9) + 1e-12 * abs(expected)


def show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --- derived tables ---------------------------------------------------------------------------

Template = list[Any]
"""An expected cell: literal strings and values (a value matches a number written in its place,
to the digits written)."""


def match_cell(written: str, template: Template) -> bool:
    pattern = "".join(
        re.escape(part) if isinstance(part, str) else f"({NUMBER})" for part in template
    )
    found = re.fullmatch(pattern, written.strip())
    if not found:
        return False
    values = [part for part in template if not isinstance(part, str)]
    return all(agrees(text, value) for text, value in zip(found.groups(), values, strict=True))


def show_template(template: Template) -> str:
    return "".join(part if isinstance(part, str) else show(part) for part in template)


class Table(NamedTuple):
    line: int  # of the header row
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (line, cells) after the separator


def split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row_key(first_cell: str) -> str | None:
    keys = re.findall(r"`([^`]+)`", first_cell)
    return keys[0].rstrip("/") if len(keys) == 1 else None


def grid_row(files: Files, folder: str) -> list[Template]:
    """``vision_grids``: PIH right, prune-first wins (and ties), the largest ``|A|`` in points."""
    summary = files.json(f"{folder}/summary.json")
    if summary.get("metric") != "acc":
        raise CheckError(f"{folder}: metric {summary.get('metric')!r}, vision_grids needs 'acc'")
    pairs, ties = summary["pairs"], summary.get("ties", 0)
    wins: Template = [summary["p_first_wins"], " / ", pairs]
    if ties:
        wins += [" (", ties, " tie)" if ties == 1 else " ties)"]
    studies = files.csv(f"{folder}/studies.csv")
    top = max(studies, key=lambda r: abs(r["A"]))
    p, q = top["study"].split("_")
    a = 100 * top["A"]
    largest: Template = ["+" if a > 0 else "", a, f" ({p}, {q})"]
    return [[summary["pih_correct"], " / ", pairs], wins, largest]


def prediction_row(files: Files, key: str) -> list[Template]:
    """``prediction``: decided pairs and each predictor's top-1 on them, from ``accuracy.csv``
    (a grid's row, or a folder's ``all`` row); with no decided pair, all pairs in parentheses."""
    if (files.results / key / "accuracy.csv").is_file():
        source, grid = f"{key}/accuracy.csv", "all"
    else:
        found = [
            p.parent.name
            for p in sorted(files.results.glob("*/accuracy.csv"))
            if any(r.get("grid") == key for r in files.csv(f"{p.parent.name}/accuracy.csv"))
        ]
        if len(found) != 1:
            raise CheckError(f"grid {key!r} is in {len(found)} accuracy.csv files, expected 1")
        source, grid = f"{found[0]}/accuracy.csv", key
    row = [r for r in files.csv(source) if r["grid"] == grid]
    if len(row) != 1:
        raise CheckError(f"{source}: {len(row)} rows for grid {grid!r}")
    row = row[0]
    cells: list[Template] = [[row["decided"], " of ", row["pairs"]]]
    for name in ("pih", "pih_cer", "prune_first", "interference", "calibration_kl"):
        everything, decided = row.get(name), row.get(f"{name} (decided)")
        if everything in (None, "n/a"):
            cells.append(["n/a"])
        elif row["decided"] == 0:
            cells.append([f"({everything})"])
        else:
            cells.append([str(decided)])
    return cells


def folder_pattern(text: str) -> re.Pattern[str]:
    """``vision_grid_<pruning>_<quantization>[_bn]/`` -> a regex over folder names."""
    text = text.rstrip("/")
    pattern = ""
    for part in re.split(r"(<[^>]+>|\[[^\]]+\])", text):
        if part.startswith("<"):
            pattern += "[a-z0-9_]+"
        elif part.startswith("["):
            pattern += f"(?:{re.escape(part[1:-1])})?"
        else:
            pattern += re.escape(part)
    return re.compile(pattern)


def check_folders(files: Files, table: Table, mismatches: list[Mismatch]) -> None:
    """``folders``: every folder named exists, and every result folder is named."""
    on_disk = sorted(p.parent.name for p in files.results.glob("*/README.md"))
    covered: set[str] = set()
    for line, cells in table.rows:
        for name in re.findall(r"`([^`]+/)`", cells[0]):
            matched = [f for f in on_disk if folder_pattern(name).fullmatch(f)]
            if not matched:
                mismatches.append(Mismatch(line, "folders", "an existing folder", name))
            covered.update(matched)
    for folder in on_disk:
        if folder not in covered:
            mismatches.append(Mismatch(table.line, "folders", f"a row for {folder}/", "none"))


KEYED: dict[str, tuple[list[str], Callable[[Files, str], list[Template]]]] = {
    "vision_grids": (["grid", "PIH right", "prune-first wins", "largest A (points)"], grid_row),
    "prediction": (
        [
            "grids",
            "decided pairs",
            "PIH",
            "PIH (C*)",
            "prune first",
            "interference",
            "calibration_kl",
        ],
        prediction_row,
    ),
}
TABLES = ("folders", *KEYED)
"""The table kinds a ``<!-- derived: KIND -->`` marker may name."""


def check_table(
    files: Files, kind: str, table: Table, mismatches: list[Mismatch], source: str
) -> None:
    header, derive = KEYED.get(kind, (["folder", "script", "question"], None))
    if table.header != header:
        written = " | ".join(table.header)
        mismatches.append(Mismatch(table.line, source, " | ".join(header), written))
        return
    if derive is None:
        check_folders(files, table, mismatches)
        return
    for line, cells in table.rows:
        key = row_key(cells[0])
        if key is None:
            mismatches.append(
                Mismatch(line, source, "one `name` in backticks in the first cell", cells[0])
            )
            continue
        try:
            expected = derive(files, key)
        except CheckError as error:
            mismatches.append(Mismatch(line, f"{source} `{key}`", "derivable data", str(error)))
            continue
        if len(cells) != len(expected) + 1:
            mismatches.append(
                Mismatch(line, f"{source} `{key}`", f"{len(expected) + 1} cells", str(len(cells)))
            )
            continue
        for column, written, template in zip(header[1:], cells[1:], expected, strict=True):
            if not match_cell(written, template):
                where = f"{source} `{key}` column {column!r}"
                mismatches.append(Mismatch(line, where, show_template(template), written))


# --- the README -------------------------------------------------------------------------------


def find_tables(lines: list[str]) -> Iterator[tuple[int, Table]]:
    """Markdown tables outside code fences: (index of the line before the table, table)."""
    fenced, i = False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and lines[i].lstrip().startswith("|"):
            start = i
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                i += 1
            block = lines[start:i]
            rows = [
                (start + 1 + j, split_row(text))
                for j, text in enumerate(block)
                if j > 0 and not re.fullmatch(r"[\s|:\-]+", text)
            ]
            yield start - 1, Table(start + 1, split_row(block[0]), rows)
            continue
        i += 1


def marker_before(lines: list[str], index: int) -> str | None:
    while index >= 0 and not lines[index].strip():
        index -= 1
    if index < 0:
        return None
    found = re.fullmatch(r"\s*<!--\s*derived:\s*(.*?)\s*-->\s*", lines[index])
    return found.group(1) if found else None


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def prose_without_markup(text: str, tables: bool = True) -> str:
    """The document with comments, code, link targets and (``tables``) table rows blanked
    (offsets kept)."""

    def blank(match: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", match.group(0))

    text = re.sub(rf"{NUMBER}<!--.*?-->", blank, text, flags=re.S)  # marked numbers
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = re.sub(r"```.*?```", blank, text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", blank, text)
    text = re.sub(r"\]\([^)]*\)", blank, text)
    return re.sub(r"(?m)^\s*\|.*$", blank, text) if tables else text


def unmarked_numbers(
    text: str, tables: bool = True, skip: frozenset[int] = frozenset()
) -> list[tuple[int, str]]:
    """Numbers in prose (and, unless ``tables``, in tables) that no marker checks, outside the
    lines ``skip`` (``--strict`` fails on them)."""
    prose = prose_without_markup(text, tables)
    found = [(line_of(prose, m.start()), m.group(1)) for m in PROSE_NUMBER.finditer(prose)]
    return [(line, number) for line, number in found if line not in skip]


def expand_braces(path: str) -> list[str]:
    found = re.search(r"\{([^}]*)\}", path)
    if not found:
        return [path]
    head, tail = path[: found.start()], path[found.end() :]
    return list(
        itertools.chain.from_iterable(
            expand_braces(head + option + tail) for option in found.group(1).split(",")
        )
    )


def path_exists(path: str) -> bool:
    """A backticked repository path: ``*`` and ``<name>`` are wildcards (at least one match),
    ``::name`` names something inside the file, ``ppq_lightning/{callbacks,datamodules}/`` are
    the top-level folders the package maps them from (``pyproject.toml``)."""
    path = path.split("::")[0]
    for package in ("callbacks", "datamodules"):
        if path.startswith(f"ppq_lightning/{package}/"):
            path = path.removeprefix("ppq_lightning/")
    pattern = re.sub(r"<[^>]+>", "*", path)
    if "*" in pattern:
        return any(ROOT.glob(pattern.rstrip("/")))
    return (ROOT / path).exists()


def show_path(path: Path) -> str:
    """A document's name in messages: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def default_documents(results: Path) -> list[Path]:
    """What is checked by default: the results index, README.md and every docs/*.md."""
    return [results / "README.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def check_document(
    path: Path, files: Files, index: bool, strict: bool = False
) -> tuple[list[Mismatch], dict[str, int]]:
    """Every mismatch between one document and the committed result files, and counts of what
    was checked. ``index`` (the results README): every table must be derived; elsewhere a table
    is checked when a ``derived`` marker precedes it, and its numbers count as unmarked if not."""
    doc = show_path(path)
    text = path.read_text()
    lines = text.splitlines()
    names = namespace(files)  # a document's let-names are its own
    mismatches: list[Mismatch] = []
    counts = {"tables": 0, "numbers": 0, "paths": 0, "unmarked": 0}
    derived_lines: set[int] = set()

    def fail(line: int, source: str, expected: str, written: str) -> None:
        mismatches.append(Mismatch(line, source, expected, written, doc))

    for before, table in find_tables(lines):
        kind = marker_before(lines, before)
        title = "| " + " | ".join(table.header) + " |"
        if kind is None and not index:
            continue  # a table of settings or definitions: its numbers are unmarked
        counts["tables"] += 1
        last = table.rows[-1][0] if table.rows else table.line + 1
        derived_lines.update(range(table.line, last + 1))
        found: list[Mismatch] = []
        if kind is None:
            found.append(
                Mismatch(table.line, "table " + title, "a <!-- derived: KIND --> marker", "none")
            )
        elif kind.split()[0] not in TABLES:
            found.append(Mismatch(table.line, "table " + title, f"a kind in {TABLES}", repr(kind)))
        else:
            check_table(files, kind.split()[0], table, found, f"derived: {kind}")
        mismatches.extend(m._replace(doc=doc) for m in found)

    code = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), text)  # markers in code: text
    inline = {m.start(2): m for m in INLINE.finditer(code)}
    for marker in MARKER.finditer(code):
        head, body, line = marker.group(1), marker.group(2), line_of(text, marker.start())
        if head == "derived:":
            continue
        if head.startswith("let"):
            name = head.split()[1].rstrip("=").strip()
            try:
                names[name] = evaluate(body, names)
            except CheckError as error:
                fail(line, f"let {name}", "a value", str(error))
            continue
        number = inline.get(marker.start(2))
        if number is None:
            fail(line, body, "a number just before <!-- =", "none")
            continue
        counts["numbers"] += 1
        try:
            expected = evaluate(body, names)
        except CheckError as error:
            fail(line, body, "a value", str(error))
            continue
        if not agrees(number.group(1), expected):
            fail(line, body, show(expected), number.group(1))

    for found_path in REPO_PATH.finditer(text):
        for repo_path in expand_braces(found_path.group(1).rstrip(".,;:)")):
            counts["paths"] += 1
            if not path_exists(repo_path):
                fail(line_of(text, found_path.start()), "path", "an existing path", repo_path)

    unmarked = unmarked_numbers(text, tables=index, skip=frozenset(derived_lines))
    counts["unmarked"] = len(unmarked)
    if strict:
        for line, number in unmarked:
            fail(line, "prose", "a <!-- = EXPR --> marker", number)
    return mismatches, counts


def check(
    results: Path, strict: bool = False, documents: list[Path] | None = None
) -> tuple[list[Mismatch], dict[str, dict[str, int]]]:
    """Every mismatch between the documents (default: :func:`default_documents`) and the files
    under ``results``, and per document the counts of what was checked."""
    files = Files(results)
    index = (results / "README.md").resolve()
    mismatches: list[Mismatch] = []
    counts: dict[str, dict[str, int]] = {}
    for path in documents if documents is not None else default_documents(results):
        found, counted = check_document(path, files, path.resolve() == index, strict)
        mismatches += found
        counts[show_path(path)] = counted
    return mismatches, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_results.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "documents",
        nargs="*",
        type=Path,
        help="Markdown files to check (default: RESULTS/README.md, README.md, docs/*.md)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="default: docs/results")
    parser.add_argument("--strict", action="store_true", help="fail on unmarked prose numbers")
    args = parser.parse_args(argv)
    mismatches, counts = check(args.results, args.strict, args.documents or None)
    for mismatch in mismatches:
        print(mismatch, file=sys.stderr)
    per_doc = {doc: sum(m.doc == doc for m in mismatches) for doc in counts}
    for doc, counted in counts.items():
        print(
            f"{doc}: {counted['tables']} tables, {counted['numbers']} marked numbers, "
            f"{counted['paths']} paths checked; {per_doc[doc]} mismatches; "
            f"{counted['unmarked']} numbers not checked"
        )
    total = {key: sum(c[key] for c in counts.values()) for key in ("tables", "numbers", "paths")}
    unmarked = sum(c["unmarked"] for c in counts.values())
    print(
        f"{len(counts)} documents against {args.results}: {total['tables']} tables, "
        f"{total['numbers']} marked numbers, {total['paths']} paths checked; "
        f"{len(mismatches)} mismatches; {unmarked} numbers not checked (--strict lists them)"
    )
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
