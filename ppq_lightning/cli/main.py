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

from ppq_lightning.cli.class_paths import check_command_line
from ppq_lightning.cli.export import export_main
from ppq_lightning.cli.lightning import PPQCLI
from ppq_lightning.cli.study import study_main
from ppq_lightning.cli.sweep import sweep_main
from ppq_lightning.errors import PPQConfigError


def main(args: list[str] | None = None) -> Any:
    """Run the ``ppq`` command line.

    Args:
        args: command-line arguments; None reads ``sys.argv``.

    Returns:
        What the command returns: the ``PPQCLI`` of ``fit``/``validate``/``test``/``predict``,
        the ``StudyResult`` of ``study``, the rows of ``sweep``, the manifest of ``export``.

    Raises:
        PPQConfigError: on a bad argument (a class path that is not a dotted identifier path of
            an installed package is refused before anything is imported), or a compression
            stage that never fired (``--trainer.limit_val_batches 0``, an empty dataloader).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "sweep":
        return sweep_main(argv[1:])
    check_command_line(argv)
    if argv and argv[0] == "study":
        return study_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    return PPQCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def entry() -> None:
    """The console script: run :func:`main`; exit 0 on success, and 2 with a one-line message
    (``ppq: error: ...``) on stderr on a :class:`PPQConfigError` of any command (jsonargparse's
    own argument errors exit 2 too)."""
    try:
        main()
    except PPQConfigError as err:
        print(f"ppq: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entry()
