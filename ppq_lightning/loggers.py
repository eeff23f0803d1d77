"""Loggers that work on a machine without network or credentials."""

from __future__ import annotations

import netrc
import os
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


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes offline by itself when there are no credentials.

    Offline runs are written under ``save_dir/wandb/offline-run-*`` and can be uploaded later
    with ``wandb sync``. ``WANDB_MODE`` in the environment, when set, is respected.

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
