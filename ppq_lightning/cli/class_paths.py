"""Class paths given on the ``ppq`` command line, checked before jsonargparse imports them.

jsonargparse imports the module of every class path it is given (``--model``, ``--data``,
``--trainer.callbacks+=...``, ``--trainer.logger``, ``--X.class_path``, ``ppq study``'s
``--stages``/``--tail``/``--logger`` ...), and importing a module runs its code. Before any of
that, :func:`check_command_line` accepts only a class name (``GPTQ``, resolved by jsonargparse
among the classes already imported) or a dotted path of Python identifiers
(``ppq_lightning.callbacks.GPTQ``) whose top-level package is installed; the package is looked
up with ``importlib.util.find_spec`` on its top-level name only, which runs no package code.
"""

from __future__ import annotations

import importlib.util
import keyword
import sys
from collections.abc import Iterator
from typing import Any

import yaml

from ppq_lightning.errors import bad_value

CLASS_ARGUMENTS = frozenset(
    {
        "model",
        "data",
        "logger",
        "stages",
        "tail",
        "optimizer",
        "lr_scheduler",
        "trainer.callbacks",
        "trainer.logger",
    }
)
"""Arguments whose string values are class names or class paths (LightningCLI's and those of
``ppq study``)."""
NAMED_ARGUMENTS = frozenset(
    {"trainer.strategy", "trainer.accelerator", "trainer.plugins", "trainer.profiler"}
)
"""Arguments that take a registered name (``ddp``, ``gpu``, ``simple``) or a class: only their
dotted values are class paths."""
_ALLOWED = (
    "a class name (e.g. GPTQ) or a dotted path of Python identifiers whose top-level package "
    "is installed (e.g. ppq_lightning.callbacks.GPTQ)"
)


def is_identifier_path(text: str) -> bool:
    """Whether ``text`` is a dotted path of Python identifiers (``a.b.C``), no keywords."""
    parts = text.split(".")
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in parts)


def _installed(package: str) -> bool:
    """Whether the top-level ``package`` can be imported, found without running its code."""
    if package in sys.modules:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_class_path(argument: str, value: Any) -> str:
    """Accept a class name or a dotted class path whose top-level package is installed.

    Args:
        argument: the argument as the user wrote it (``"--model"``), for the message.
        value: the class name or path given.

    Returns:
        ``value``.

    Raises:
        PPQConfigError: naming ``argument`` and ``value``: not a string of dotted Python
            identifiers, or a top-level package that is not installed.
    """
    if not isinstance(value, str) or not value or not is_identifier_path(value):
        raise bad_value(argument, value, _ALLOWED)
    package = value.split(".")[0]
    if "." in value and not _installed(package):
        raise bad_value(
            argument,
            value,
            f"{_ALLOWED}; no package {package!r} is installed (check the spelling, or "
            f"`pip install` the package that provides {package!r})",
        )
    return value


def _class_values(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(argument, class name)`` of every class named in ``value``, the parsed value of
    ``--key``: the value itself for a class argument (a string, or each string of a list) and
    every ``class_path`` of its dicts, at any depth."""
    if isinstance(value, dict):
        if "class_path" in value:
            yield f"{key}.class_path", value["class_path"]
        for name, inner in value.items():
            if name != "class_path":
                yield from _class_values(inner, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for item in value:
            yield from _class_values(item, key)
    elif isinstance(value, str) and (
        key in CLASS_ARGUMENTS or (key in NAMED_ARGUMENTS and "." in value)
    ):
        yield key, value


def _options(argv: list[str]) -> Iterator[tuple[str, str]]:
    """``(key, text)`` of every ``--key VALUE`` / ``--key=VALUE`` in ``argv`` whose key names a
    class (``+`` of ``--trainer.callbacks+=X`` removed)."""
    i = 0
    while i < len(argv):
        item = argv[i]
        i += 1
        if not item.startswith("--"):
            continue
        key, equals, text = item[2:].partition("=")
        key = key.rstrip("+")
        if key.endswith((".class_path", ".help")) or key == "config":
            leaf = True
        else:
            leaf = key in CLASS_ARGUMENTS or key in NAMED_ARGUMENTS
        if not leaf:
            continue
        if not equals:
            if i >= len(argv) or argv[i].startswith("--"):
                continue  # no value: the parser says what is missing
            text = argv[i]
            i += 1
        yield key, text


def check_command_line(argv: list[str]) -> None:
    """Check every class path of a ``ppq`` command line before anything imports it.

    Looks at ``--model``, ``--data``, ``--trainer.callbacks[+]``, ``--trainer.logger``,
    ``--optimizer``, ``--lr_scheduler``, ``ppq study``'s ``--stages``, ``--tail`` and
    ``--logger``, any ``--X.class_path`` and ``--X.help``, the dotted values of
    ``--trainer.strategy|accelerator|plugins|profiler``, and the class paths of YAML or JSON
    values (``--trainer.callbacks='[{"class_path": ...}]'``, an inline ``--config`` string).
    Config files are read by the parser, not here.

    Args:
        argv: the command's arguments, without the program name.

    Raises:
        PPQConfigError: naming the argument and the value, see :func:`check_class_path`.
    """
    for key, text in _options(argv):
        if key == "config":
            if "\n" not in text and not text.lstrip().startswith("{"):
                continue  # a file: the parser reads it
            key = ""
        if key.endswith((".class_path", ".help")):
            check_class_path(f"--{key}", text)
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        for argument, name in _class_values(value, key):
            check_class_path(f"--{argument.lstrip('.')}", name)
