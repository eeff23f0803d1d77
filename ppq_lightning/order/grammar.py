"""The order grammar: a compression order written as stage names joined by ``>``.

``"P>Q"`` applies the stage named ``P`` first, then ``Q``; ``"P1>Q>P2"`` is a three-stage order
(e.g. the sparsity split over two pruning stages); ``"Q8>Q4>Q2"`` a mixed-precision progression.
A name is a letter followed by letters, digits or ``_``; spaces around ``>`` are allowed. Names
are bound to compression callbacks by their ``name`` argument (YAML:
``init_args: {name: P, sparsity: 0.5}``). Any ordering of distinct configured names is an order.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import TypeVar

from ppq_lightning.errors import PPQConfigError

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
T = TypeVar("T")


def parse_order(text: str, known: Iterable[str] | None = None) -> tuple[str, ...]:
    """Parse ``"P>Q"`` into ``("P", "Q")``.

    Args:
        text: the order string.
        known: the configured stage names; when given, every name must be one of them.

    Raises:
        PPQConfigError: on a non-string or empty order, an empty or malformed name, a repeated
            name, or a name that is not configured.
    """
    if not isinstance(text, str) or not text.strip():
        raise PPQConfigError(
            f"order={text!r} is not allowed: expected stage names joined by '>', e.g. 'P>Q'."
        )
    names = tuple(part.strip() for part in text.split(">"))
    for name in names:
        if not NAME.fullmatch(name):
            raise PPQConfigError(
                f"order={text!r}: {name!r} is not a stage name (a letter, then letters, digits "
                "or '_'); stages are joined by '>', e.g. 'P1>Q>P2'."
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PPQConfigError(
            f"order={text!r} repeats {repeated[0]!r}: a stage is applied once; give a second "
            "stage of the same method its own name (e.g. P1, P2)."
        )
    if known is not None:
        known = list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PPQConfigError(
                f"order={text!r} names {unknown[0]!r}, which is not a configured stage; "
                f"configured: {', '.join(known) or 'none'}."
            )
    return names


def format_order(names: Sequence[str]) -> str:
    """The order string of ``names``: ``("P", "Q") -> "P>Q"``; ``()`` is ``"dense"``."""
    return ">".join(names) if names else "dense"


def all_orders(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every permutation of ``names`` (all stages, each once), in lexicographic position order."""
    return list(itertools.permutations(names))


def check_stage_names(names: Sequence[str], grammar: bool = True) -> None:
    """Stages used in orders need distinct names (and, with ``grammar``, names that an order
    string can spell).

    Raises:
        PPQConfigError: on a repeated name or one that is not a letter followed by letters,
            digits or ``_``.
    """
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise PPQConfigError(
            f"two stages are named {repeated[0]!r}: give every stage a distinct `name` "
            "(its name in orders, e.g. P and Q)."
        )
    for name in names if grammar else ():
        if not NAME.fullmatch(name):
            raise PPQConfigError(
                f"stage name {name!r} cannot appear in an order: use a letter, then letters, "
                "digits or '_' (e.g. P50, Q4, P2_4)."
            )


def arrange(items: Sequence[T], names: Sequence[str], order: str) -> list[T]:
    """The ``items`` (named ``names``, in the same positions) in the sequence ``order`` gives.

    Raises:
        PPQConfigError: as :func:`parse_order` does, and when two items share a name.
    """
    check_stage_names(names, grammar=False)
    by_name = dict(zip(names, items, strict=True))
    return [by_name[name] for name in parse_order(order, names)]
