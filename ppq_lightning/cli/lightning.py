"""``PPQCLI``: LightningCLI with the compression schedule's ``--order`` and ``--report_dir``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ppq_lightning.callbacks import CompressionSchedule
from ppq_lightning.callbacks.base import check_trainer_stages
from ppq_lightning.errors import PPQConfigError

T = TypeVar("T")

_ARGS_WARNING = r"LightningCLI's args parameter is intended to run from within Python"


def config_error(error: BaseException) -> PPQConfigError | None:
    """The :class:`PPQConfigError` that ``error`` wraps, if any: jsonargparse reports a class
    whose constructor refused its arguments as a ``ValueError`` about Union subtypes, with the
    constructor's error as its cause."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, PPQConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def instantiate_clearly(instantiate: Callable[[], T]) -> T:
    """Run ``instantiate`` (jsonargparse building the configured classes), raising the
    :class:`PPQConfigError` of a constructor that refused its arguments (``paths=['/nope'] is
    not allowed ...``) instead of jsonargparse's Union traceback around it.

    Raises:
        PPQConfigError: the one a constructor raised.
    """
    try:
        return instantiate()
    except (ValueError, TypeError) as err:
        found = config_error(err)
        if found is None or found is err:
            raise
        raise found from None


class PPQCLI(LightningCLI):
    """LightningCLI with ``--order`` and ``--report_dir`` for the config's compression schedule.

    Arguments are parsed as LightningCLI parses them; ``ppq`` hands over the command line it
    read from ``sys.argv`` as ``args``, so LightningCLI's warning about ``args`` given beside
    ``sys.argv`` (meant for a script that passes other arguments than its own) is not shown.
    A constructor's :class:`PPQConfigError` reaches the caller as itself.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ARGS_WARNING)
            super().parse_arguments(parser, args)

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

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Check the configured compression stages together before Lightning builds the
        Trainer: two identical stages get our message (set ``name=``) instead of Lightning's
        about callback state keys.

        Raises:
            PPQConfigError: see ``ppq_lightning.callbacks.base.check_trainer_stages``.
        """
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        check_trainer_stages(callbacks if isinstance(callbacks, list) else [callbacks])
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """Build the model, datamodule and trainer, then apply ``--order``/``--report_dir``.

        Raises:
            PPQConfigError: from a constructor, or when ``--order``/``--report_dir`` is given
                without a CompressionSchedule in ``trainer.callbacks``.
        """
        instantiate_clearly(super().instantiate_classes)
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
