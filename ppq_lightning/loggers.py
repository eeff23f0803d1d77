"""Loggers that work on a machine without network or credentials, and under ``wandb agent``.

A W&B sweep agent runs each point as a new process with the run it created named in the
environment (``WANDB_RUN_ID``, ``WANDB_SWEEP_ID``, ``WANDB_DIR``, ``WANDB_SWEEP_PARAM_PATH``):
:class:`WandbLogger` attaches to that run, and :func:`agent_run_id` is what the command line
uses to give each such run its own output folder.
"""

from __future__ import annotations

import atexit
import netrc
import os
import re
import sys
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from ppq_lightning.errors import bad_value

RUN_ID = "WANDB_RUN_ID"
WANDB_DIR = "WANDB_DIR"
DEFAULT_SAVE_DIR = "outputs"
_RUN_ID_CHARS = re.compile(r"[A-Za-z0-9_-]+")


def agent_run_id() -> str | None:
    """The W&B run this process belongs to, as ``wandb agent`` names it for every run it starts
    (``WANDB_RUN_ID``); None when unset or empty.

    Raises:
        PPQConfigError: when ``WANDB_RUN_ID`` is not a run id W&B creates (letters, digits,
            ``_`` and ``-``): it names a folder.
    """
    run_id = os.environ.get(RUN_ID, "").strip()
    if not run_id:
        return None
    if not _RUN_ID_CHARS.fullmatch(run_id):
        raise bad_value(RUN_ID, run_id, "a W&B run id: letters, digits, '_' and '-'")
    return run_id


def run_folder(trainer: L.Trainer) -> str:
    """The folder of the Trainer's current run, where its own files go (the CLI's
    ``config.yaml``, a ``CompressionSchedule``'s ``schedule.json``): the first logger's
    ``log_dir`` (``SAVE_DIR/NAME/version_N`` of a CSV or TensorBoard logger,
    ``SAVE_DIR/PROJECT/RUN_ID`` of :class:`WandbLogger`), else its ``save_dir``, else the
    Trainer's ``default_root_dir``.

    ``Trainer.log_dir`` gives the ``save_dir`` itself for every logger but CSV and TensorBoard,
    so with a W&B logger every run wrote into the same folder. Nothing is broadcast: call it
    on every rank and broadcast the result, or on rank 0 only.

    Args:
        trainer: the Trainer of the run (its loggers have started their runs: Lightning starts
            them before any callback's ``setup``).
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        folder = logger.log_dir or logger.save_dir
        if folder is not None:
            return os.fspath(folder)
    return os.fspath(trainer.default_root_dir)


def has_wandb_credentials() -> bool:
    """Whether a W&B API key is available (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def finish_run(run: Any, failed: bool = False) -> None:
    """Finish a W&B run that is still open (a finished one is left as is).

    What a :class:`WandbLogger` registers with ``atexit`` for its run: Lightning never finishes
    it, and a run still open when Python exits is finished by W&B's service process, which
    prints the run's closing notice ("You can sync this run to the cloud by running: wandb sync
    ...") with terminal colour codes even into a file or a pipe. Finished here, the same notice
    goes through W&B's Python printer, which writes colour to a terminal only.

    Args:
        run: a ``wandb`` run.
        failed: mark the run failed (exit code 1) rather than finished.
    """
    if not getattr(run, "_is_finished", True):
        run.finish(exit_code=1 if failed else 0)


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes offline by itself when there are no credentials,
    attaches to the run a ``wandb agent`` started, and has a run folder of its own.

    Offline runs are written under ``save_dir/wandb/offline-run-*`` and can be uploaded later
    with ``wandb sync``. ``WANDB_MODE`` in the environment, when set, is respected. A run still
    open when Python exits is finished by :func:`finish_run`, so that W&B's closing notice
    holds no raw terminal escape codes in logs; Lightning's unused ``anonymous=None`` is not
    passed on to ``wandb.init`` (which warns that the setting has no effect).

    Under ``wandb agent`` (``WANDB_RUN_ID`` set) the logger's ``id`` is the agent's run, so the
    metrics reach the run the sweep reads them from (inside a sweep W&B says it ignores the
    ``project`` and ``run_id`` given to ``wandb.init``: the agent's run already has them, the
    same id). :attr:`log_dir` is
    ``save_dir/project/run id``, the folder Lightning's ``ModelCheckpoint`` puts this logger's
    checkpoints under: one folder per run, where ``ppq fit|validate|test`` write ``config.yaml``
    and the schedule's report (:func:`run_folder`).

    Args:
        offline: True/False to force; None (default) for offline exactly when no API key is
            found and ``WANDB_MODE`` is unset.
        save_dir: where the ``wandb`` folder of the runs goes; None (default): ``WANDB_DIR``
            when set (as ``wandb.init`` itself does; ``wandb agent`` sets it), else
            ``outputs``. Lightning's ``dir`` is read when ``save_dir`` is None.
        id: the W&B run id to log to (``version`` is Lightning's other name for it); None
            (default): ``WANDB_RUN_ID`` when set, else a new run.
        **kwargs: every other argument of ``lightning.pytorch.loggers.WandbLogger``
            (``project``, ``name``, ...).

    Raises:
        PPQConfigError: when ``WANDB_RUN_ID`` is not a run id (see :func:`agent_run_id`).

    Example (YAML)::

        trainer:
          logger:
            class_path: ppq_lightning.loggers.WandbLogger
            init_args: {project: ppq-lightning}
    """

    def __init__(
        self,
        offline: bool | None = None,
        save_dir: str | None = None,
        id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not has_wandb_credentials()
        if save_dir is None:
            save_dir = kwargs.pop("dir", None) or os.environ.get(WANDB_DIR) or DEFAULT_SAVE_DIR
        if id is None and kwargs.get("version") is None:
            id = agent_run_id()
        super().__init__(offline=offline, save_dir=os.fspath(save_dir), id=id, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self._finish_registered = False
        self._status: str | None = None

    @property
    def log_dir(self) -> str | None:
        """``save_dir/project/run id``: this run's own folder (Lightning's checkpoints of this
        logger go to its ``checkpoints`` subfolder); None while the run id is unknown (no run
        started and no ``id`` given)."""
        if self.version is None:
            return None
        return os.path.join(self.save_dir or DEFAULT_SAVE_DIR, str(self.name), str(self.version))

    @property
    def experiment(self) -> Any:
        """The W&B run (created on first use; a dummy on ranks other than 0), finished at
        exit by :func:`finish_run` if nothing finished it before."""
        run = super().experiment
        is_wandb_run = type(run).__module__.startswith("wandb.")  # not rank > 0's dummy
        if not self._finish_registered and is_wandb_run:
            atexit.register(self._finish_at_exit, run)
            self._finish_registered = True
        return run

    def finalize(self, status: str) -> None:
        """Remember how the Trainer's last run ended (``"success"``/``"failed"``): the run
        finished at exit is marked failed after a failed one."""
        self._status = status
        super().finalize(status)

    def _finish_at_exit(self, run: Any) -> None:
        # failed: Lightning said so, or Python exits on an uncaught exception (sys.last_value)
        failed = self._status == "failed" or getattr(sys, "last_value", None) is not None
        finish_run(run, failed=failed)
