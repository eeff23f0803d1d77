"""lm-eval-harness tasks as metrics of an in-memory causal LM (``CausalLMModule(tasks=...)``).

The harness's ``HFLM`` wraps the instantiated (compressed) model and its tokenizer: nothing is
reloaded from disk, so the accuracy belongs to exactly the weights being studied. Tasks are
looked up among the local tasks shipped here (``pydoc_cloze``), the folders of
``include_path`` (lm-eval custom task YAML, e.g. over local JSON files) and then the harness's
own registry (ARC, HellaSwag, PIQA, WinoGrande, LAMBADA, ...: their data come from the
Hugging Face hub). Metrics are named ``<task>/<metric>`` (``pydoc_cloze/acc``,
``arc_challenge/acc_norm``; a filter other than ``none`` is kept as ``<metric>,<filter>``),
each with the direction the task declares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import logging
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from ppq_lightning.errors import CompressionError, PPQConfigError, bad_value, check_int
from ppq_lightning.models.loading import load_tokenizer

LOCAL_TASKS = Path(__file__).parent / "assets" / "lm_tasks"
"""The folder of the tasks shipped with ppq-lightning (each in a sub-folder)."""
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
"""``dataset_path`` values that ``datasets`` builds from local files, without the hub."""
_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def lm_eval_module() -> Any:
    """The ``lm_eval`` package.

    Raises:
        PPQConfigError: when lm-eval-harness is not installed.
    """
    try:
        import lm_eval
    except ImportError as err:
        raise PPQConfigError(
            "task metrics need lm-eval-harness: pip install 'lm_eval>=0.4.5' "
            "(or pip install -e '.[tasks]')."
        ) from err
    return lm_eval


@functools.cache
def task_manager(include_path: tuple[str, ...], defaults: bool) -> Any:
    """An lm-eval ``TaskManager`` over ``include_path`` (and the harness's own tasks when
    ``defaults``; indexing those takes seconds, so managers are cached)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path), include_defaults=defaults)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) answers a TCP
    connection within ``timeout`` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout):
            return True
    except OSError:
        return False


def needs_hub(config: dict[str, Any]) -> bool:
    """Whether a task config reads its data from the hub (not a local builder, folder or
    ``custom_dataset`` function)."""
    if config.get("custom_dataset") is not None:
        return False
    path = config.get("dataset_path")
    if not isinstance(path, str):
        return False
    return path not in LOCAL_BUILDERS and not Path(path).expanduser().exists()


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random state on exit (the harness seeds
    all three; a validation run inside ``fit`` must not change the training's randomness)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


_EXPECTED = (
    "`pretrained` model kwarg is not of type `str`",  # an instance is the point here
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",  # said of every custom_dataset task
)
_HARNESS_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator")


class _Expected(logging.Filter):
    """Hide the harness's warnings about what this integration does on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED)


@contextlib.contextmanager
def quiet_harness() -> Iterator[None]:
    """Silence the expected warnings of ``_EXPECTED`` (and only those) while inside."""
    quiet, loggers = _Expected(), [logging.getLogger(n) for n in _HARNESS_LOGGERS]
    for log in loggers:
        log.addFilter(quiet)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(quiet)


def metric_key(task: str, key: str) -> str | None:
    """``<task>/<metric>`` of a harness result key ``"<metric>,<filter>"`` (None for the
    standard errors and the alias)."""
    metric, _, kept = key.partition(",")
    if key == "alias" or metric.endswith("_stderr"):
        return None
    return f"{task}/{metric}" + ("" if kept in ("", "none") else f",{kept}")


@dataclasses.dataclass
class TaskEvaluation:
    """Which lm-eval-harness tasks a ``CausalLMModule`` evaluates, and how.

    Constructing it checks every argument and loads every task's data, so an unknown task or
    a hub task on a machine without network fails here, before any weight changes.

    Args:
        tasks: task, group or tag names: ``pydoc_cloze`` (local, offline), tasks in
            ``include_path``, or the harness's (``arc_challenge``, ``hellaswag``, ``piqa``,
            ``winogrande``, ``lambada_openai``; they need the network or a filled
            ``datasets`` cache).
        num_fewshot: few-shot examples per prompt (None: each task's default, else 0).
        limit: evaluate only the first ``limit`` documents of each task (an int >= 1), or
            that fraction of them (a float in (0, 1)); None: all.
        batch_size: requests per forward pass.
        tokenizer: the tokenizer's name (``smollm2-135m``, ``bytes``, a local folder or a hub
            id); None: the module's ``model`` name.
        include_path: folders of custom task YAML files (lm-eval's format; for local data
            use ``dataset_path: json`` with absolute ``data_files``, or ``custom_dataset``).
        max_length: longest context in tokens (None: the model config's).
        seed: the harness's random, NumPy, torch and few-shot seed (the global random state
            is restored afterwards).

    Raises:
        PPQConfigError: on an empty or non-string ``tasks``, an unknown task (close names are
            suggested), a hub task while the hub is unreachable, a task whose data cannot be
            loaded, ``num_fewshot``/``batch_size``/``max_length``/``seed`` that are not
            integers in range, a ``limit`` that is not an int >= 1 or a float in (0, 1), an
            ``include_path`` entry that is not a folder, or lm_eval not installed.

    Example (YAML)::

        model:
          class_path: ppq_lightning.models.CausalLMModule
          init_args:
            model: smollm2-135m
            tasks: {tasks: [pydoc_cloze], limit: 200, batch_size: 8}
    """

    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 8
    tokenizer: str | None = None
    include_path: list[str] | None = None
    max_length: int | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        if (
            not isinstance(self.tasks, (list, tuple))
            or not self.tasks
            or not all(isinstance(t, str) and t.strip() for t in self.tasks)
        ):
            raise bad_value("tasks", self.tasks, "a non-empty list of task names")
        self.tasks = list(self.tasks)
        check_int("num_fewshot", self.num_fewshot, minimum=0, allow_none=True)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("max_length", self.max_length, minimum=2, allow_none=True)
        check_int("seed", self.seed, minimum=0)
        limit = self.limit
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or (isinstance(limit, int) and limit < 1)
            or (isinstance(limit, float) and not 0 < limit < 1)
        ):
            raise bad_value(
                "limit", limit, "None, an int >= 1 (documents) or a float in (0, 1) (a share)"
            )
        if self.tokenizer is not None and (
            not isinstance(self.tokenizer, str) or not self.tokenizer.strip()
        ):
            raise bad_value("tokenizer", self.tokenizer, "None or a tokenizer name")
        folders = self.include_path or []
        if not isinstance(folders, (list, tuple)) or not all(
            isinstance(f, (str, os.PathLike)) and Path(f).is_dir() for f in folders
        ):
            raise bad_value("include_path", self.include_path, "None or a list of folders")
        self.include_path = [str(f) for f in folders] or None
        lm_eval_module()
        self._manager = self._find_manager()
        self._check_data()
        self._directions = self._declared_directions()
        self._tokenizer: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> TaskEvaluation:
        """A copy that shares the loaded tasks and the tokenizer (settings, not model state:
        a study copies its model for every order)."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin._directions = dict(self._directions)
        return twin

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__post_init__()  # loads the tasks again (and fails as construction would)

    # -- finding and loading the tasks --------------------------------------------------------
    @property
    def _paths(self) -> tuple[str, ...]:
        return (str(LOCAL_TASKS), *(self.include_path or []))

    def _find_manager(self) -> Any:
        local = task_manager(self._paths, False)
        if all(t in local.all_tasks for t in self.tasks):
            return local  # the harness's own index is not needed (it takes seconds)
        manager = task_manager(self._paths, True)
        unknown = [t for t in self.tasks if t not in manager.all_tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5)
            raise bad_value(
                "tasks",
                unknown[0],
                "an lm-eval task, group or tag name "
                + (f"(close: {', '.join(close)})" if close else "(see `lm_eval ls tasks`)")
                + f"; local tasks: {', '.join(local.all_tasks)}",
            )
        return manager

    def _leaves(self, name: str) -> list[str]:
        index = self._manager.task_index
        entry = index[name]
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK"):
            return [name]
        if kind == "TAG":
            return [n for n, e in index.items() if name in (e.tags or ()) and n != name]
        children = (entry.cfg or {}).get("task", [])
        children = children if isinstance(children, list) else [children]
        named = [c for c in children if isinstance(c, str) and c in index]
        return [leaf for child in named for leaf in self._leaves(child)]

    def _check_data(self) -> None:
        """Load every task's data now; a hub task without a reachable hub is refused first."""
        hub = [
            name
            for name in self.tasks
            if any(needs_hub(self._manager.task_index[t].cfg or {}) for t in self._leaves(name))
        ]
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in _OFFLINE)
        if hub and not offline and not hub_reachable():
            raise self._needs_network(hub, "the Hugging Face hub is unreachable from here")
        try:
            with quiet_harness():
                self._loaded = self._manager.load(list(self.tasks))
        except Exception as err:  # the harness and datasets raise many types
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if hub:
                raise self._needs_network(hub, f"loading failed ({reason})") from err
            raise PPQConfigError(
                f"tasks={self.tasks!r}: the task data could not be loaded ({reason})."
            ) from err

    def _needs_network(self, hub: list[str], why: str) -> PPQConfigError:
        leaf = next(t for t in self._leaves(hub[0]) if needs_hub(self._manager.task_index[t].cfg))
        path = self._manager.task_index[leaf].cfg.get("dataset_path")
        return PPQConfigError(
            f"tasks: {hub[0]!r} needs the network: its data ({path!r}) come from the Hugging "
            f"Face hub and {why}. Use a local task (pydoc_cloze, or your own YAML over local "
            "files in include_path), or run where the hub is reachable (a filled datasets "
            "cache also works, with HF_DATASETS_OFFLINE=1)."
        )

    def _declared_directions(self) -> dict[str, bool]:
        directions: dict[str, bool] = {}
        for name, task in self._loaded["tasks"].items():
            filters = task.config.filter_list or [{"name": "none"}]
            for metric, higher in task.higher_is_better().items():
                for kept in filters:
                    key = metric_key(name, f"{metric},{kept.get('name', 'none')}")
                    if key is not None:
                        directions[key] = bool(higher)
        for group, children in self._loaded.get("group_map", {}).items():
            for child in children:  # a group reports what its tasks report (a superset)
                for key, higher in list(directions.items()):
                    if key.startswith(f"{child}/"):
                        directions.setdefault(f"{group}/{key.split('/', 1)[1]}", higher)
        return directions

    # -- what it reports --------------------------------------------------------------------
    def metric_names(self) -> dict[str, bool]:
        """Every ``<task>/<metric>`` the tasks report, with whether higher is better."""
        return dict(self._directions)

    def config(self) -> dict[str, Any]:
        """The arguments as a plain dict (for hyperparameters and checkpoints)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def signature(self) -> str:
        """What the task metrics depend on besides the weights (part of a study's cell key)."""
        return json.dumps(self.config(), sort_keys=True)

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer instance (the module's, when ``tokenizer`` is None)."""
        self._tokenizer = tokenizer

    def _tokenizer_for(self, default_name: str | None) -> Any:
        if self._tokenizer is None:
            name = self.tokenizer or default_name
            if name is None:
                raise PPQConfigError(
                    "tasks: the task metrics need a tokenizer: set tasks.tokenizer (a wrapped "
                    "model has no name to load one by)."
                )
            self._tokenizer = load_tokenizer(name)
        return self._tokenizer

    @torch.no_grad()
    def evaluate(self, model: nn.Module, default_tokenizer: str | None = None) -> dict[str, float]:
        """Run the tasks on ``model`` as it is in memory.

        Args:
            model: a Hugging Face causal LM (in eval mode; the caller restores its mode).
            default_tokenizer: the tokenizer's name when ``tokenizer`` is None.

        Returns:
            ``{"<task>/<metric>": value}``, every metric of every task (and group).

        Raises:
            CompressionError: when the harness would re-tie or move the model's weights.
        """
        lm_eval = lm_eval_module()
        from lm_eval.models.huggingface import HFLM

        pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
        tokenizer = self._tokenizer_for(default_tokenizer)
        with quiet_harness():
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
            )
        moved = [n for n, p in model.named_parameters() if pointers.get(n) != p.data_ptr()]
        if moved:
            raise CompressionError(
                f"the harness changed the storage of {moved[:3]} (tie_weights re-tied a layer "
                "that compression had untied): the task metrics would not be the compressed "
                "model's."
            )
        with preserved_random_state(), quiet_harness():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(self.tasks),
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                bootstrap_iters=0,
                log_samples=False,
                task_manager=self._manager,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        metrics: dict[str, float] = {}
        for task, values in out["results"].items():
            declared = out.get("higher_is_better", {}).get(task) or {}
            for key, value in values.items():
                name = metric_key(task, key)
                higher = declared.get(key.split(",")[0])
                if name is not None and higher is not None and isinstance(value, (int, float)):
                    metrics[name], self._directions[name] = float(value), bool(higher)
        return metrics
