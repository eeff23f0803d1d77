"""Class paths given on the ``ppq`` command line, checked before jsonargparse imports them.

jsonargparse imports the module of every class path it is given (``--model``, ``--data``,
``--trainer.callbacks+=...``, ``--trainer.logger``, ``--X.class_path``, ``ppq study``'s
``--stages``/``--tail``/``--logger``, the class paths of a ``--config`` file ...), and importing a
module runs its code. Before any of that, :func:`check_command_line` accepts only a class name
(``GPTQ``, resolved by jsonargparse among the classes already imported) or a dotted path of
Python identifiers (``ppq_lightning.callbacks.GPTQ``) that passes :func:`check_class_path`,
which runs no code of the path's modules:

1. Its top-level package is installed: found with the current folder taken off ``sys.path``
   (``''``, ``'.'``, and entries that are the current folder, unless a ``.pth`` file of
   site-packages or an absolute ``PYTHONPATH`` entry put that folder there), and the same package
   is found with it (a folder of the current directory that shadows an installed package is
   refused). ``python -m ppq_lightning.cli.main`` puts the current folder on ``sys.path``; an
   ``evilmod.py`` there is never imported. (A folder named like a package ppq imports as it
   starts, ``torchvision/``, runs before any check under ``python -m``: Python's own rule; the
   ``ppq`` script and ``python -P -m`` do not put the current folder on ``sys.path``.) An
   editable install of the folder (``pip install -e .``) is found by its finder, so it is
   allowed from its own folder.
2. Each further part is found as a submodule by the import machinery's finders given the
   parent's search locations, without importing the parent (``importlib.util.find_spec`` of a
   submodule would run the parent's ``__init__``).
3. The first part that is no module must be a name the module's source binds at its top level
   (read with :mod:`ast`, not run): a class, or an import or an assignment of something other
   than a literal. A name the module does not bind, a function, a literal, or a module is
   refused: ``this.Foo`` is refused without printing the Zen of Python. A module whose names
   cannot be read (no source, a module ``__getattr__``, a ``from ... import *`` that does not
   bind the name by itself) is accepted.
"""

from __future__ import annotations

import ast
import keyword
import os
import site
import sys
from collections.abc import Iterator
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Any

import yaml

from ppq_lightning.errors import bad_value
from ppq_lightning.yaml_numbers import load_yaml

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
_INSTALL = (
    "class paths are imported only from installed packages, never from the current folder: "
    "`pip install -e` the folder that holds it, or put that folder on PYTHONPATH as an "
    "absolute path"
)
_LITERALS = (
    ast.Constant,
    ast.JoinedStr,
    ast.Dict,
    ast.List,
    ast.Set,
    ast.Tuple,
    ast.ListComp,
    ast.DictComp,
    ast.SetComp,
    ast.GeneratorExp,
    ast.Lambda,
)
_MAX_DEPTH = 8  # re-exports followed (a from-import of a from-import ...) before accepting


def is_identifier_path(text: str) -> bool:
    """Whether ``text`` is a dotted path of Python identifiers (``a.b.C``), no keywords."""
    parts = text.split(".")
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in parts)


def _resolved(entry: str) -> str:
    return os.path.realpath(entry or os.curdir)


def _deliberate_folders() -> set[str]:
    """Folders put on ``sys.path`` on purpose: the path lines of site-packages' ``.pth`` files
    (an editable install of the old kind) and the absolute entries of ``PYTHONPATH``."""
    folders = set()
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isabs(entry):
            folders.add(_resolved(entry))
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    for sitedir in {*site.getsitepackages(), *([user] if isinstance(user, str) else [])}:
        try:
            pth_files = sorted(Path(sitedir).glob("*.pth"))
        except OSError:
            continue
        for pth in pth_files:
            try:
                lines = pth.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    folders.add(_resolved(os.path.join(sitedir, line)))
    return folders


def _safe_sys_path() -> list[str]:
    """``sys.path`` without the current folder: ``''``, ``'.'`` and entries that resolve to the
    current folder, unless that folder was put there on purpose (:func:`_deliberate_folders`)."""
    cwd = _resolved(os.getcwd())
    keep_cwd = cwd in _deliberate_folders()
    safe = []
    for entry in sys.path:
        if not isinstance(entry, str) or entry in ("", os.curdir):
            continue
        if not keep_cwd and _resolved(entry) == cwd:
            continue
        safe.append(entry)
    return safe


def _find(fullname: str, path: list[str] | None, sys_path: list[str] | None = None) -> Any:
    """The spec the import machinery would find for ``fullname`` (``path``: its parent's
    search locations, None for a top-level name), asking each finder of ``sys.meta_path`` as
    importing does but importing nothing; ``sys_path`` replaces ``sys.path`` for top-level
    names. None when no finder finds it."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            if finder is PathFinder and path is None and sys_path is not None:
                spec = PathFinder.find_spec(fullname, sys_path)
            else:
                spec = find_spec(fullname, path)
        except (ImportError, ValueError, OSError):
            spec = None
        if spec is not None:
            return spec
    return None


def _where(spec: ModuleSpec) -> tuple[str | None, tuple[str, ...]]:
    locations = spec.submodule_search_locations or ()
    return (
        None if spec.origin is None else _resolved(spec.origin),
        tuple(sorted(_resolved(p) for p in locations)),
    )


def _installed_spec(package: str) -> tuple[ModuleSpec | None, str | None]:
    """``(spec, None)`` of the installed top-level ``package``, or ``(None, why not)``."""
    everywhere = _find(package, None)
    if everywhere is None:
        return None, (
            f"no package {package!r} is installed (check the spelling, or `pip install` the "
            f"package that provides {package!r})"
        )
    installed = _find(package, None, _safe_sys_path())
    if installed is None:
        return None, (
            f"{package!r} is found only in the current folder ({everywhere.origin}); {_INSTALL}"
        )
    if _where(installed) != _where(everywhere):
        return None, (
            f"{package!r} of the current folder ({everywhere.origin}) shadows the installed "
            f"{package!r} ({installed.origin}); {_INSTALL}"
        )
    return installed, None


def _module_spec(name: str) -> ModuleSpec | None:
    """The spec of the module ``name`` (dotted), found without importing any of it; None when
    it is not found or not installed."""
    parts = name.split(".")
    spec, _ = _installed_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = _find(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec


def _top_level_bindings(tree: ast.Module) -> Iterator[ast.stmt]:
    """The statements at the top level of a module: those of its body and of its
    ``if``/``try``/``with`` blocks (their names are the module's), not those of functions or
    classes."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        yield node
        blocks: list[list[ast.stmt]] = []
        if isinstance(node, (ast.If, ast.With)):
            blocks = [node.body, getattr(node, "orelse", [])]
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            handlers = [handler.body for handler in node.handlers]
            blocks = [node.body, *handlers, node.orelse, node.finalbody]
        for block in reversed(blocks):
            stack.extend(reversed(block))


def _assigned(node: ast.stmt) -> list[tuple[str, ast.expr | None]]:
    """``(name, value)`` of every plain name an assignment binds."""
    if isinstance(node, ast.Assign):
        return [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [(node.target.id, node.value)]
    return []


def _from_module(spec: ModuleSpec, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` in the module ``spec`` reads."""
    if not node.level:
        return node.module or ""
    package = spec.name if spec.submodule_search_locations is not None else spec.parent or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _class_binding(spec: ModuleSpec, name: str, depth: int = 0) -> str | None:
    """None when the module ``spec`` may give a class ``name`` (its source binds ``name`` to a
    class, an import of one or a non-literal value, or cannot be read), else why not."""
    if depth > _MAX_DEPTH:
        return None
    try:
        source = spec.loader.get_source(spec.name) if spec.loader is not None else None
        tree = ast.parse(source) if source is not None else None
    except (ImportError, OSError, SyntaxError, ValueError, AttributeError):
        return None  # no readable source (compiled, frozen): the import will say
    if tree is None:
        return None
    reasons, stars = [], []
    for node in _top_level_bindings(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == "__getattr__":
                return None  # a lazy module (PEP 562)
            if node.name == name:
                reasons.append(f"{spec.name}.{name} is a function, not a class")
        for target, value in _assigned(node):
            if target == name:
                if value is None or not isinstance(value, _LITERALS):
                    return None
                reasons.append(f"{spec.name}.{name} is a literal value, not a class")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name:
                    reasons.append(f"{spec.name}.{name} is a module, not a class")
        if isinstance(node, ast.ImportFrom):
            source_module = _from_module(spec, node)
            for alias in node.names:
                if alias.name == "*":
                    stars.append(source_module)
                elif (alias.asname or alias.name) == name:
                    reason = _imported_class(source_module, alias.name, depth)
                    if reason is None:
                        return None
                    reasons.append(reason)
    if stars:
        return None  # a star import may bind it: not read further
    return reasons[0] if reasons else f"the module {spec.name!r} defines no {name!r}"


def _imported_class(module: str, name: str, depth: int) -> str | None:
    """:func:`_class_binding` of ``from module import name``: None when it may be a class."""
    spec = _module_spec(module)
    if spec is None:
        return None  # not found without importing (e.g. an optional dependency): accepted
    locations = spec.submodule_search_locations
    if locations is not None and _find(f"{module}.{name}", list(locations)) is not None:
        return f"{module}.{name} is a module, not a class"
    return _class_binding(spec, name, depth + 1)


def check_class_path(argument: str, value: Any) -> str:
    """Accept a class name, or a dotted class path that names a class of an installed package,
    checked without importing anything (the rules of this module's docstring).

    Args:
        argument: the argument as the user wrote it (``"--model"``), for the message.
        value: the class name or path given.

    Returns:
        ``value``.

    Raises:
        PPQConfigError: naming ``argument`` and ``value``: not a string of dotted Python
            identifiers; a top-level package that is not installed, found only in the current
            folder, or shadowed by the current folder; a path that names a module, or a name its
            module does not bind to a class.
    """
    if not isinstance(value, str) or not value or not is_identifier_path(value):
        raise bad_value(argument, value, _ALLOWED)
    if "." not in value:
        return value
    parts = value.split(".")
    spec, why = _installed_spec(parts[0])
    if spec is None:
        raise bad_value(argument, value, f"{_ALLOWED}; {why}")
    module = parts[0]
    for part in parts[1:]:
        if spec.submodule_search_locations is None:
            break
        found = _find(f"{module}.{part}", list(spec.submodule_search_locations))
        if found is None:
            break
        spec, module = found, f"{module}.{part}"
    if module == value:
        raise bad_value(argument, value, f"{_ALLOWED}; {value!r} is a module, not a class in it")
    why = _class_binding(spec, value[len(module) + 1 :].split(".")[0])
    if why is not None:
        raise bad_value(argument, value, f"{_ALLOWED}; {why}")
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
        if item == "-c" or item.startswith("-c="):
            item = "--config" + item[2:]
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


_CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".jsonnet")


def _config_file(text: str) -> Any:
    """The parsed content of the config file ``text`` names, or None when ``text`` names no
    readable YAML or JSON file (the parser then says what is wrong)."""
    path = Path(text)
    try:
        if not path.is_file():
            return None
        return load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
        return None


def _check_value(key: str, value: Any, depth: int = 0) -> None:
    """Check every class named in ``value``, the parsed value of ``--key``; a string that names
    a config file (``--model model.yaml``, a path of a ``--config`` file) is read and checked
    too."""
    for argument, name in _class_values(value, key):
        if isinstance(name, str) and name.endswith(_CONFIG_SUFFIXES) and depth < 4:
            content = _config_file(name)
            if content is not None:
                _check_value(argument.removesuffix(".class_path"), content, depth + 1)
                continue
        check_class_path(f"--{argument.lstrip('.')}", name)


def check_command_line(argv: list[str]) -> None:
    """Check every class path of a ``ppq`` command line before anything imports it.

    Looks at ``--model``, ``--data``, ``--trainer.callbacks[+]``, ``--trainer.logger``,
    ``--optimizer``, ``--lr_scheduler``, ``ppq study``'s ``--stages``, ``--tail`` and
    ``--logger``, any ``--X.class_path`` and ``--X.help``, the dotted values of
    ``--trainer.strategy|accelerator|plugins|profiler``, the class paths of YAML or JSON
    values (``--trainer.callbacks='[{"class_path": ...}]'``, an inline ``--config`` string),
    and those of the config files named (``--config``/``-c`` files, ``--model model.yaml``).

    Args:
        argv: the command's arguments, without the program name.

    Raises:
        PPQConfigError: naming the argument and the value, see :func:`check_class_path`.
    """
    for key, text in _options(argv):
        if key == "config":
            if "\n" not in text and not text.lstrip().startswith("{"):
                content = _config_file(text)
                if content is not None:
                    _check_value("", content)
                continue  # not a readable file: the parser says so
            key = ""
        if key.endswith((".class_path", ".help")):
            check_class_path(f"--{key}", text)
            continue
        try:
            value = load_yaml(text)
        except yaml.YAMLError:
            value = text
        _check_value(key, value)
