"""The ``ppq`` command.

- ``ppq fit|validate|test|predict --config ...``: LightningCLI over any LightningModule and
  datamodule; the compression callbacks of the config fire in list order.
- ``ppq study --config ...``: an order study (``ppq_lightning.study_cli``).
- ``ppq sweep SWEEP.yaml --output DIR``: run a W&B sweep file locally, one run per grid point,
  and aggregate the results (``ppq_lightning.sweep``).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> Any:
    """Run the ``ppq`` command line.

    Args:
        args: command-line arguments; None reads ``sys.argv``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "study":
        from ppq_lightning.study_cli import study_main

        return study_main(argv[1:])
    if argv and argv[0] == "sweep":
        from ppq_lightning.sweep import sweep_main

        return sweep_main(argv[1:])
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def entry() -> None:
    """The console script: run :func:`main`, exit 0 on success and 2 with a one-line message on a
    configuration error of ``ppq study`` / ``ppq sweep``."""
    from ppq_lightning.errors import PPQConfigError

    try:
        main()
    except PPQConfigError as err:
        sys.exit(f"ppq: error: {err}")


if __name__ == "__main__":
    entry()
