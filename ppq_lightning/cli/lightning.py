"""``PPQCLI``: LightningCLI with the compression schedule's ``--order`` and ``--report_dir``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ppq_lightning.callbacks import CompressionSchedule
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
