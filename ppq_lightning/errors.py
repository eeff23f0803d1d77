"""The project's error types and the argument checks every layer uses.

Bad input raises :class:`PPQConfigError` (a ``ValueError``) naming the argument, the value given
and what is allowed. A compressed state that breaks the invariants of ``docs/definitions.md``
raises :class:`InvariantError`.

The checks (:func:`check_int`, :func:`check_number`, :func:`check_choice`, :func:`check_bool`)
return the value they accept, so a constructor reads ``self.r = check_int("r", r, minimum=1)``;
booleans are never accepted as numbers; NumPy scalars and 0-d tensors are, as the Python number
they hold (:func:`plain_number`).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class PPQConfigError(ValueError):
    """An argument has a value that is not allowed."""


class CompressionError(RuntimeError):
    """A stage failed on the data or weights it was given (e.g. it produced NaN weights); the
    layers it was compressing are restored before this propagates."""


class InvariantError(RuntimeError):
    """A compressed module's weights disagree with its recorded mask or grid."""


class CorruptStateError(InvariantError, PPQConfigError):
    """A loaded state (a checkpoint, a state dict) is not a consistent compressed state: the
    file is corrupt or was edited after it was written. An :class:`InvariantError`, and a
    :class:`PPQConfigError` since the file is bad input: ``ppq`` ends with one line naming it
    (exit 2), not a traceback."""


def bad_value(argument: str, value: Any, allowed: str) -> PPQConfigError:
    """Build the one message shape every validation error uses.

    Args:
        argument: name of the argument as the user writes it (``"sparsity"``).
        value: the value that was given.
        allowed: what is allowed, in words (``"a float in [0, 1)"``).

    Returns:
        A :class:`PPQConfigError` to ``raise``.
    """
    return PPQConfigError(f"{argument}={value!r} is not allowed: expected {allowed}.")


def plain_number(value: Any) -> Any:
    """``value`` as a Python ``int`` or ``float`` when it is a NumPy scalar (``np.int64(4)``,
    ``np.float32(0.5)``) or a 0-d tensor/array of numbers (``torch.tensor(0.5)``), which users
    pass for numbers; anything else (booleans of any kind included) is returned unchanged."""
    if isinstance(value, bool) or "bool" in type(value).__name__ or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        dtype = str(getattr(value, "dtype", ""))
        if "bool" in dtype or "complex" in dtype:
            return value
        try:
            plain = item()
        except (TypeError, ValueError, RuntimeError):
            return value
        if isinstance(plain, (int, float)) and not isinstance(plain, bool):
            return plain
    return value


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_int(
    argument: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    allowed: str | None = None,
) -> Any:
    """Accept an integer (not a bool) in ``[minimum, maximum]``.

    Args:
        argument: the argument's name, for the message.
        value: the value given.
        minimum, maximum: inclusive bounds; None for none.
        allow_none: also accept None (returned as is).
        allowed: the message's "expected ..." text instead of the generated one.

    Returns:
        ``value``; a NumPy integer or a 0-d integer tensor as a Python ``int``
        (:func:`plain_number`).

    Raises:
        PPQConfigError: naming ``argument``, ``value`` and the allowed range.
    """
    if allow_none and value is None:
        return None
    value = plain_number(value)
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        text = allowed or _int_range(minimum, maximum)
        raise bad_value(argument, value, f"None or {text}" if allow_none and not allowed else text)
    return value


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"a number in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_number(
    argument: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allowed: str | None = None,
) -> Any:
    """Accept a real number (an int or float, not a bool, not NaN) within the given bounds.

    Args:
        argument: the argument's name, for the message.
        value: the value given.
        low, high: the bounds; None for none (an unbounded number must still be finite).
        low_open, high_open: exclude the bound itself (``(0, 1)`` is ``low_open=high_open=True``).
        allow_none: also accept None (returned as is).
        allowed: the message's "expected ..." text instead of the generated one.

    Returns:
        ``value`` as given, a NumPy scalar or a 0-d tensor as a Python number
        (:func:`plain_number`; the caller converts it when it needs a float).

    Raises:
        PPQConfigError: naming ``argument``, ``value`` and the allowed interval.
    """
    if allow_none and value is None:
        return None
    value = plain_number(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok and low is None and high is None:
        ok = math.isfinite(value)
    if not ok:
        text = allowed or _interval(low, high, low_open, high_open)
        raise bad_value(argument, value, f"None or {text}" if allow_none and not allowed else text)
    return value


def check_choice(argument: str, value: T, choices: Iterable[Any]) -> T:
    """Accept one of ``choices``.

    Raises:
        PPQConfigError: naming ``argument``, ``value`` and every choice.
    """
    choices = tuple(choices)
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise bad_value(argument, value, f"one of {', '.join(str(c) for c in choices)}")
    return value


def check_bool(argument: str, value: Any) -> bool:
    """Accept ``True`` or ``False`` only (not ``"false"``, not 0/1).

    Raises:
        PPQConfigError: naming ``argument`` and ``value``.
    """
    if not isinstance(value, bool):
        raise bad_value(argument, value, "true or false")
    return value


def check_folder(argument: str, value: Any) -> Path:
    """Accept a path that is a folder or can become one (no part of it is a file), before any
    work is done that would end in writing there.

    Raises:
        PPQConfigError: naming ``argument`` and ``value`` when it, or a folder above it, is a
            file, or when it is not a path.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise bad_value(argument, value, "a folder path")
    path = Path(value)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise bad_value(argument, str(value), f"a folder, but {str(part)!r} is a file")
            break
    return path


def check_count_or_ratio(count_argument: str, count: Any, ratio: Any) -> None:
    """Accept exactly one of an integer count >= 1 (``count_argument``: ``n_blocks``,
    ``rank``) and a ``ratio`` in (0, 1).

    Raises:
        PPQConfigError: naming both when both or neither are given, else the bad one.
    """
    if (count is None) == (ratio is None):
        raise PPQConfigError(f"{count_argument}={count!r}, ratio={ratio!r}: give exactly one.")
    check_int(count_argument, count, minimum=1, allow_none=True, allowed="an integer >= 1")
    check_number("ratio", ratio, 0, 1, True, True, allow_none=True, allowed="a number in (0, 1)")
