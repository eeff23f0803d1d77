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
- ``ppq``, ``ppq -h``, ``ppq --help``: every subcommand with a one-line description.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer

from ppq_lightning.cli.class_paths import check_command_line
from ppq_lightning.cli.export import export_main
from ppq_lightning.cli.lightning import PPQCLI
from ppq_lightning.cli.outcome import PROGRESS, Interrupted, RunProgress, signals_raise
from ppq_lightning.cli.study import study_main
from ppq_lightning.cli.sweep import sweep_main
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.reports import disk_full_cause
from ppq_lightning.yaml_numbers import jsonargparse_reads_base_60_as_text

# the subcommands ppq adds to LightningCLI's: name -> (entry point, one-line description)
OWN_SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "study": (study_main, "Measure or predict the best order of the stages."),
    "sweep": (sweep_main, "Run a W&B sweep file locally, one run per point."),
    "export": (export_main, "Write a compressed model in a format runtimes load."),
}
HELP = ("-h", "--help")


def _first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def subcommand_help() -> dict[str, str]:
    """Every ``ppq`` subcommand with its one-line description: LightningCLI's (``fit``,
    ``validate``, ``test``, ``predict``: the first sentence of the ``Trainer`` method's
    docstring) and ppq's own (``study``, ``sweep``, ``export``)."""
    lightning = {
        name: _first_sentence(inspect.getdoc(getattr(Trainer, name)) or name)
        for name in PPQCLI.subcommands()
    }
    return lightning | {name: text for name, (_, text) in OWN_SUBCOMMANDS.items()}


def help_text() -> str:
    """What ``ppq --help`` prints: the subcommands, each with one line, and LightningCLI's
    options that go before a subcommand."""
    parser = argparse.ArgumentParser(
        prog="ppq",
        description="ppq-lightning: model compression as Lightning callbacks, with the order "
        "of the methods as a variable to configure, study and predict.",
        epilog="fit, validate, test and predict are LightningCLI's: the compression callbacks "
        "of their config fire first, in list order. `ppq SUBCOMMAND --help` lists the "
        "arguments of a subcommand.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="(fit, validate, test, predict) a config file given before the subcommand",
    )
    parser.add_argument(
        "--print_config",
        metavar="=flags",
        nargs="?",
        help="(fit, validate, test, predict) print the configuration and exit",
    )
    subcommands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name, text in subcommand_help().items():
        subcommands.add_parser(name, help=text)
    return parser.format_help()


def main(args: list[str] | None = None, progress: RunProgress | None = None) -> Any:
    """Run the ``ppq`` command line.

    Args:
        args: command-line arguments; None reads ``sys.argv``.
        progress: filled with what the command has done (its Trainer once built), for the line
            :func:`entry` prints when the command does not finish; None for none.

    Returns:
        What the command returns: the ``PPQCLI`` of ``fit``/``validate``/``test``/``predict``,
        the ``StudyResult`` of ``study``, the rows of ``sweep``, the manifest of ``export``;
        None for ``ppq --help`` (the help is printed).

    Raises:
        PPQConfigError: on no subcommand or an unknown one (naming every subcommand), on a bad
            argument (a class path that is not a dotted identifier path of an installed package
            is refused before anything is imported), or a compression stage that never fired
            (``--trainer.limit_val_batches 0``, an empty dataloader).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] and argv[0] in HELP:
        print(help_text())
        return None
    known = list(subcommand_help())
    if not argv or (not argv[0].startswith("-") and argv[0] not in known):
        given = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
        raise PPQConfigError(
            f"{given}: expected one of {', '.join(known)} (`ppq --help` says what each does)."
        )
    if argv[0] == "sweep":
        return sweep_main(argv[1:])
    jsonargparse_reads_base_60_as_text()
    check_command_line(argv)
    if argv[0] in OWN_SUBCOMMANDS:
        return OWN_SUBCOMMANDS[argv[0]][0](argv[1:])
    return PPQCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
        progress=progress,
    )


def _path_written(error: OSError) -> str | None:
    """The file a failed write was writing: the error's ``filename``, else the innermost frame
    of its traceback holding a ``filepath``/``path`` (Lightning's checkpoint writer raises the
    write's ``OSError`` without a file name)."""
    if error.filename is not None:
        return str(error.filename)
    found, tb = None, error.__traceback__
    while tb is not None:
        for name in ("filepath", "path"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, str | os.PathLike):
                found = os.fspath(value)
                break
        tb = tb.tb_next
    return found


def entry() -> None:
    """The console script: run :func:`main` and exit with its outcome.

    - 0: the command finished.
    - 2: a :class:`PPQConfigError` (one line, ``ppq: error: ...``; jsonargparse's own argument
      errors exit 2 too); when the command had started running, a second line says what it
      had done and how to resume.
    - ``128 + signum``: ``SIGTERM`` (143), ``SIGINT`` (130) or ``SIGHUP`` (129) ended it
      (``cli.outcome``: the first such signal unwinds the command at once), or Lightning's own
      ``SIGTERM`` handling stopped a Trainer (``SIGTERMException``, which would exit 0).
    - 1: a full disk, quota or file-size limit (``ENOSPC``, ``EFBIG``, ``EDQUOT``: one line
      naming the file, no traceback), or any other exception (its traceback, then the line).

    Every exit but 0 ends with one line on stderr saying how the command ended, what it had
    done (stages applied, global step, last checkpoint; cells measured) and how to resume.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    argv = sys.argv[1:]
    progress = RunProgress(argv)
    token = PROGRESS.set(progress)
    try:
        with signals_raise():
            main(argv, progress)
    except PPQConfigError as err:
        print(f"ppq: error: {err}", file=sys.stderr)
        if progress.trainer is not None and progress.trainer.state.fn is not None:
            print(
                progress.line("stopped on the error above", first="fix the error above"),
                file=sys.stderr,
            )
        sys.exit(2)
    except Interrupted as err:  # on a line of its own, after a progress bar's last one
        print(f"\n{progress.line(f'interrupted by {err.name}')}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SIGTERMException:  # a SystemExit with code None: Lightning's SIGTERM, not success
        print(f"\n{progress.line('interrupted by SIGTERM')}", file=sys.stderr)
        sys.exit(128 + 15)
    except KeyboardInterrupt:  # SIGINT outside signals_raise (another thread's handler)
        print(f"\n{progress.line('interrupted by SIGINT')}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        full = disk_full_cause(err)
        if full is not None:  # an ordinary condition: one line, no traceback
            where = _path_written(full)
            where = f" writing {where!r}" if where else ""
            print(f"ppq: error: no room on the disk{where}: {full}", file=sys.stderr)
            line = progress.line("stopped: the disk was full", first="free space on the disk")
            print(line, file=sys.stderr)
            sys.exit(1)
        traceback.print_exc()
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        failed = f"failed with {type(err).__name__}" + (f": {reason}" if reason else "")
        print(progress.line(failed), file=sys.stderr)
        sys.exit(1)
    finally:
        PROGRESS.reset(token)


if __name__ == "__main__":
    entry()
