"""YAML as ppq reads it: ``2:4`` is the text ``"2:4"``, not the base-60 number 124, and ``1e-3``
is a number.

PyYAML follows YAML 1.1, where an unquoted ``2:4`` is the sexagesimal integer ``2 * 60 + 4 = 124``
and ``1:30.5`` a sexagesimal float; YAML 1.2 (2009) dropped both. In a compression config such a
scalar is an N:M sparsity pattern (``pattern: 2:4``), and reading it as 124 turned the user's
intent into a confusing error. Every YAML that ppq reads resolves it as the text it is:
LightningCLI's configs and command-line values (jsonargparse's loader,
:func:`jsonargparse_reads_base_60_as_text`), sweep files and study configs (:func:`load_yaml`).
As in YAML 1.2 and jsonargparse, ``1e-3`` is a float (PyYAML's 1.1 resolver wants a dot and read
a sweep's ``lr: 1e-3`` as the text ``"1e-3"``).

Example (a LightningCLI config; ``2:4`` needs no quotes)::

    trainer:
      callbacks:
        - class_path: ppq_lightning.callbacks.WandaPruning
          init_args: {pattern: 2:4}
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _NotBase60:
    """A resolver pattern that matches what ``pattern`` matches, except base-60 numbers."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern

    def match(self, value: str) -> re.Match[str] | None:
        return None if _BASE_60.match(value) else self.pattern.match(value)


def read_base_60_as_text(loader: type) -> type:
    """Make ``loader`` (a PyYAML loader class) resolve base-60 scalars as strings.

    The change is made on the class's own copy of the implicit resolvers (its base classes keep
    theirs) and is idempotent.

    Args:
        loader: a subclass of a PyYAML loader (``yaml.SafeLoader``, ``yaml.CSafeLoader``).

    Returns:
        ``loader``, changed.
    """
    if "yaml_implicit_resolvers" not in loader.__dict__:
        loader.yaml_implicit_resolvers = {
            first: list(mappings) for first, mappings in loader.yaml_implicit_resolvers.items()
        }
    for first, mappings in loader.yaml_implicit_resolvers.items():
        loader.yaml_implicit_resolvers[first] = [
            (tag, _NotBase60(pattern))
            if tag in _NUMBER_TAGS and not isinstance(pattern, _NotBase60)
            else (tag, pattern)
            for tag, pattern in mappings
        ]
    return loader


class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader without base-60 numbers."""


read_base_60_as_text(Loader)
# YAML 1.2 reads 1e-3 as a float; PyYAML's 1.1 resolver wants a dot (1.0e-3) and gives the text
# "1e-3" (a sweep's `lr: 1e-3`). jsonargparse's loader reads it as a float too.
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse ``text`` as ``yaml.safe_load`` does, with ``2:4`` read as the text ``"2:4"`` and
    ``1e-3`` as a float.

    Args:
        text: YAML text.

    Raises:
        yaml.YAMLError: when ``text`` is not YAML.
    """
    return yaml.load(text, Loader=Loader)


def jsonargparse_reads_base_60_as_text() -> None:
    """Make jsonargparse's YAML loader (LightningCLI's configs and command-line values) read
    base-60 scalars as text. jsonargparse keeps its loader class private
    (``_loaders_dumpers.get_yaml_default_loader``); a jsonargparse that moves it fails the test
    ``tests/test_yaml_numbers.py`` rather than silently reading 124 again."""
    from jsonargparse import _loaders_dumpers

    read_base_60_as_text(_loaders_dumpers.get_yaml_default_loader())
