"""Loggers that work on a machine without network or credentials."""

from __future__ import annotations

import atexit
import netrc
import os
import sys
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


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
    """Lightning's ``WandbLogger`` that goes offline by itself when there are no credentials.

    Offline runs are written under ``save_dir/wandb/offline-run-*`` and can be uploaded later
    with ``wandb sync``. ``WANDB_MODE`` in the environment, when set, is respected. A run still
    open when Python exits is finished by :func:`finish_run`, so that W&B's closing notice
    holds no raw terminal escape codes in logs; Lightning's unused ``anonymous=None`` is not
    passed on to ``wandb.init`` (which warns that the setting has no effect).

    Args:
        offline: True/False to force; None (default) for offline exactly when no API key is
            found and ``WANDB_MODE`` is unset.
        **kwargs: every argument of ``lightning.pytorch.loggers.WandbLogger``
            (``project``, ``name``, ``save_dir``, ...).

    Example (YAML)::

        trainer:
          logger:
            class_path: ppq_lightning.loggers.WandbLogger
            init_args: {project: ppq-lightning, save_dir: outputs}
    """

    def __init__(self, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not has_wandb_credentials()
        super().__init__(offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self._finish_registered = False
        self._status: str | None = None

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
