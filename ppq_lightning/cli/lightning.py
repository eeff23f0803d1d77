"""``PPQCLI``: LightningCLI with the compression schedule's ``--order`` and ``--report_dir``,
and one folder per run for ``config.yaml`` and the schedule's report."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ppq_lightning.callbacks import CompressionSchedule
from ppq_lightning.callbacks.base import check_trainer_stages
from ppq_lightning.callbacks.random_state import RandomStateCheckpoint
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.loggers import agent_run_id, run_folder
from ppq_lightning.yaml_numbers import jsonargparse_reads_base_60_as_text

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


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` writing ``config.yaml`` into the run's own folder
    (:func:`ppq_lightning.loggers.run_folder`: ``SAVE_DIR/PROJECT/RUN_ID`` with a W&B logger)
    instead of ``Trainer.log_dir``, which is the W&B logger's ``save_dir`` shared by every run.
    Everything else (``overwrite``, ``multifile``, ``config_filename``, rank 0 writes, the
    ``save_config`` hook) is Lightning's."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            folder = trainer.strategy.broadcast(run_folder(trainer))
            path = os.path.join(folder, self.config_filename)
            fs = get_filesystem(folder)
            exists = trainer.strategy.broadcast(
                fs.isfile(path) if trainer.is_global_zero and not self.overwrite else False
            )
            if exists:
                raise RuntimeError(
                    f"{type(self).__name__} expected {path} to NOT exist. Aborting to avoid "
                    "overwriting results of a previous run (LightningCLI's "
                    'save_config_kwargs={"overwrite": True} overwrites it).'
                )
            if trainer.is_global_zero:
                fs.makedirs(folder, exist_ok=True)
                self.parser.save(
                    self.config,
                    path,
                    skip_none=False,
                    overwrite=self.overwrite,
                    multifile=self.multifile,
                )
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class PPQCLI(LightningCLI):
    """LightningCLI with ``--order`` and ``--report_dir`` for the config's compression schedule.

    Arguments are parsed as LightningCLI parses them; ``ppq`` hands over the command line it
    read from ``sys.argv`` as ``args``, so LightningCLI's warning about ``args`` given beside
    ``sys.argv`` (meant for a script that passes other arguments than its own) is not shown.
    A constructor's :class:`PPQConfigError` reaches the caller as itself.

    ``config.yaml`` goes into the run's own folder (:class:`RunConfigCallback`), as does the
    schedule's report when no folder is named. Under ``wandb agent`` (``WANDB_RUN_ID`` set), a
    report folder that is named (``--report_dir``, a schedule's ``output_dir``) gets a subfolder
    named by the run id, so that the sweep's points do not overwrite each other's reports.

    Every Trainer gets a :class:`~ppq_lightning.callbacks.random_state.RandomStateCheckpoint`
    (first in its callbacks) unless the config has one: a ``fit`` resumed with ``--ckpt_path``
    draws the random numbers the uninterrupted fit draws.

    Args:
        progress: a ``cli.outcome.RunProgress`` that gets the Trainer once it is built (what
            ``ppq`` reports when the command does not finish); None for none.
        *args: LightningCLI's.
        **kwargs: LightningCLI's.
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any) -> None:
        jsonargparse_reads_base_60_as_text()  # pattern: 2:4 is "2:4", not 124
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        self.progress = progress
        super().__init__(*args, **kwargs)

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
        """Build the model, datamodule and trainer, then apply ``--order``/``--report_dir``;
        under ``wandb agent`` a named report folder gets the run id as a subfolder.

        Raises:
            PPQConfigError: from a constructor, or when ``--order``/``--report_dir`` is given
                without a CompressionSchedule in ``trainer.callbacks``.
        """
        instantiate_clearly(super().instantiate_classes)
        if self.progress is not None:
            self.progress.trainer = self.trainer
        if not any(isinstance(cb, RandomStateCheckpoint) for cb in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, RandomStateCheckpoint())
        config = self.config[self.subcommand] if self.subcommand else self.config
        order, report_dir = config.get("order"), config.get("report_dir")
        schedules = [cb for cb in self.trainer.callbacks if isinstance(cb, CompressionSchedule)]
        if (order is not None or report_dir is not None) and not schedules:
            raise PPQConfigError(
                f"--order={order!r} / --report_dir={report_dir!r} need a CompressionSchedule "
                "(ppq_lightning.callbacks.CompressionSchedule) in trainer.callbacks."
            )
        if order is not None:
            schedules[0].set_order(order)
        if report_dir is not None:
            schedules[0].output_dir = report_dir
        run_id = agent_run_id()
        if run_id is not None:  # a sweep's points must not share a named report folder
            for schedule in schedules:
                if schedule.output_dir is not None:
                    schedule.output_dir = os.path.join(schedule.output_dir, run_id)
