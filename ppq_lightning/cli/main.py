"""The ``ppq`` command.

- ``ppq fit|validate|test|predict --config ...``: LightningCLI over any LightningModule and
  datamodule; the compression callbacks of the config fire in list order. ``--order "Q>L>P"``
  re-orders the stages of the config's (first) ``CompressionSchedule`` and ``--report_dir DIR``
  sets where it writes ``schedule.json``/``schedule.csv`` (what ``ppq sweep`` reads).
- ``ppq study --config ...``: an order study (``ppq_lightning.cli.study``).
- ``ppq sweep SWEEP.yaml --output DIR``: run a W&B sweep file locally, one run per grid point,
  and aggregate the results (``ppq_lightning.cli.sweep``).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ppq_lightning.callbacks import CompressionSchedule
from ppq_lightning.cli.study import study_main
from ppq_lightning.cli.sweep import sweep_main
from ppq_lightning.errors import PPQConfigError


class PPQCLI(LightningCLI):
    """LightningCLI with ``--order`` and ``--report_dir`` for the config's compression schedule."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--order",
            type=str | None,
            default=None,
            help='order of the CompressionSchedule stages, e.g. "Q>L>P" (default: as configured)',
        )
        parser.add_argument(
            "--report_dir",
            type=str | None,
            default=None,
            help="folder for the CompressionSchedule's schedule.json/csv (default: the log dir)",
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        order, report_dir = config.get("order"), config.get("report_dir")
        if order is None and report_dir is None:
            return
        schedules = [cb for cb in self.trainer.callbacks if isinstance(cb, CompressionSchedule)]
        if not schedules:
            raise PPQConfigError(
                f"--order={order!r} / --report_dir={report_dir!r} need a CompressionSchedule "
                "(ppq_lightning.callbacks.CompressionSchedule) in trainer.callbacks."
            )
        if order is not None:
            schedules[0].set_order(order)
        if report_dir is not None:
            schedules[0].output_dir = report_dir


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
