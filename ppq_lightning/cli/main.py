"""The ``ppq`` command.

- ``ppq fit|validate|test|predict --config ...``: LightningCLI over any LightningModule and
  datamodule; the compression callbacks of the config fire in list order. ``--order "Q>L>P"``
  re-orders the stages of the config's (first) ``CompressionSchedule`` and ``--report_dir DIR``
  sets where it writes ``schedule.json``/``schedule.csv`` (what ``ppq sweep`` reads).
- ``ppq study --config ...``: an order study (``ppq_lightning.cli.study``).
- ``ppq export --format ppq|compressed-tensors|gguf|peft --path DIR --ckpt|--from-study|--config
  ...``: export a compressed model (``ppq_lightning.cli.export``).
- ``ppq sweep SWEEP.yaml --output DIR``: run a W&B sweep file locally, one run per grid point,
  and aggregate the results (``ppq_lightning.cli.sweep``).
"""

from __future__ import annotations

import sys
from typing import Any

from ppq_lightning.cli.export import export_main
from ppq_lightning.cli.lightning import PPQCLI
from ppq_lightning.cli.study import study_main
from ppq_lightning.cli.sweep import sweep_main
from ppq_lightning.errors import PPQConfigError


def main(args: list[str] | None = None) -> Any:
    """Run the ``ppq`` command line.

    Args:
        args: command-line arguments; None reads ``sys.argv``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "study":
        return study_main(argv[1:])
    if argv and argv[0] == "sweep":
        return sweep_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    return PPQCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def entry() -> None:
    """The console script: run :func:`main`, exit 0 on success and 2 with a one-line message on a
    configuration error of ``ppq study`` / ``ppq sweep``."""
    try:
        main()
    except PPQConfigError as err:
        sys.exit(f"ppq: error: {err}")


if __name__ == "__main__":
    entry()
