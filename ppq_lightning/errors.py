"""The project's error types.

Bad input raises :class:`PPQConfigError` (a ``ValueError``) naming the argument, the value given
and what is allowed. A compressed state that breaks the invariants of ``shared/DESIGN.md``
raises :class:`InvariantError`.
"""

from __future__ import annotations

from typing import Any


class PPQConfigError(ValueError):
    """An argument has a value that is not allowed."""


class InvariantError(RuntimeError):
    """A compressed module's weights disagree with its recorded mask or grid."""


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
