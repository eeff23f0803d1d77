"""Result files: one writer for the CSV / JSON / Markdown tables of schedules, studies and sweeps.

Every file is written atomically: the text goes to a temporary file with a unique name in the
same folder, which then replaces the target (``os.replace``), so a reader (or a resumed run)
sees the old file or the new one, never half of one, and two writers cannot collide.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any


class DiskFullError(OSError):
    """A result file could not be written: the disk, a quota or the file-size limit had no room
    (``ENOSPC``, ``EFBIG`` "File too large", ``EDQUOT``). The message names the file, which is
    left as it was; ``errno`` is the original one, so ``except OSError`` still catches it."""


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file (unique name, same folder) that replaces ``path`` when the block
    ends without an error; on an error it is removed and ``path`` is left as it was.

    Args:
        path: the file to write (its folder is created if needed).
        mode: ``"w"`` (text, no newline translation) or ``"wb"``.

    Raises:
        DiskFullError: naming ``path`` when the disk, a quota or the file-size limit has no
            room for it (``path`` is unchanged, the temporary file removed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as error:
        raise _disk_full(path, error) or error from None
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
        os.chmod(temporary, 0o666 & ~current_umask())  # as open() makes it, not mkstemp's 0600
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise _disk_full(path, error) or error from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _disk_full(path: Path, error: OSError) -> DiskFullError | None:
    """The one clear error of a write the disk had no room for (``ENOSPC``, ``EFBIG`` "File
    too large", ``EDQUOT``), else None."""
    if error.errno not in _FULL:
        return None
    return DiskFullError(
        error.errno,
        f"writing {str(path)!r} failed: {error.strerror or error}; "
        f"{str(path)!r} was left as it was and no partial file remains. Free disk space (or "
        "raise the quota or file-size limit), or write to another folder, and run again.",
    )


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EFBIG``/``EDQUOT`` :class:`OSError` behind ``error`` (itself, or along
    its ``__cause__``/``__context__`` chain: a library may wrap it), else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename).

    The folder is created if needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (values JSON cannot hold become strings)."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str))


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in the order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``rows`` as CSV with a header (missing values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or columns_of(rows)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table (floats to 4 significant digits)."""
    columns = list(columns or columns_of(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


FORMATS = ("csv", "json", "md")


def write_table(
    rows: Sequence[dict[str, Any]],
    folder: str | Path,
    stem: str,
    json_data: Any = None,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Path]:
    """Write ``rows`` as ``<stem>.csv``, ``<stem>.json`` and ``<stem>.md`` in ``folder``.

    Args:
        rows: one dict per row; the columns are their keys in order of first appearance.
        folder: where the files go (created if needed).
        stem: the file name without extension (``"sweep"``, ``"schedule"``, ``"studies"``).
        json_data: what the JSON file holds instead of the rows (e.g. the rows with metadata).
        formats: which of ``"csv"``, ``"json"``, ``"md"`` to write.

    Returns:
        The written paths by extension (``{"csv": ..., "json": ..., "md": ...}``).
    """
    folder = Path(folder)
    columns = columns_of(rows)
    texts = {
        "csv": lambda: csv_text(rows, columns),
        "json": lambda: json.dumps(
            list(rows) if json_data is None else json_data, indent=2, default=str
        ),
        "md": lambda: markdown_table(rows, columns) + "\n",
    }
    return {f: write_text_atomic(folder / f"{stem}.{f}", texts[f]()) for f in formats}
