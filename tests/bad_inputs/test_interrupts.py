"""Interrupted is never success: a ``ppq`` command that a signal or an exception ends exits
non-zero, with one line on stderr saying what it had done and how to resume.

The signal tests run real ``ppq`` processes and send the signal once the run is provably in the
middle of its work (a checkpoint of the first training step, a study's first cell on disk), then
check that it had not finished (no report written) and that it ended with ``128 + signum``.
SIGTERM is what a batch scheduler's preemption sends; before this, ``ppq fit`` exited 0 on it
(Lightning's ``SIGTERMException`` is a ``SystemExit`` without a code)."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppq_lightning.cli.outcome import Interrupted
from ppq_lightning.errors import PPQConfigError
from tests.bad_inputs.helpers import tiny_fit_config

cli_main = importlib.import_module("ppq_lightning.cli.main")  # the package exports main()

ROOT = Path(__file__).parents[2]
PPQ = [sys.executable, "-m", "ppq_lightning.cli.main"]


def _signalled_when(command: list[str], ready, signum: int) -> tuple[int, str]:
    """Start ``command``, send ``signum`` as soon as ``ready()`` holds (the process still
    running), and return its exit code and stderr."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the command ended before the signal"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def _fit_command(tmp_path: Path) -> list[str]:
    """The tiny LoRA fit (P>Q>L) for 10000 steps with a checkpoint after every step."""
    path = tiny_fit_config(tmp_path, max_steps=10000)
    return [*PPQ, "fit", "--config", str(path), f"--report_dir={tmp_path / 'report'}"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_fit_exits_128_plus_signum_and_says_how_to_resume(tmp_path, signum):
    command = _fit_command(tmp_path)
    code, stderr = _signalled_when(
        command, lambda: any((tmp_path / "ckpts").glob("*.ckpt")), signum
    )
    assert not (tmp_path / "report" / "schedule.json").exists()  # it landed mid-fit
    assert code == 128 + signum, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"ppq: fit interrupted by {name}; "), line
    assert "stages applied: P, Q" in line and "global step" in line
    (checkpoint,) = (tmp_path / "ckpts").glob("*.ckpt")
    assert f"last checkpoint: {checkpoint}" in line
    assert f"--ckpt_path {checkpoint}" in line


def test_sigterm_during_a_study_exits_143_and_says_how_to_resume(tmp_path):
    command = [*PPQ, "study", "--config", "configs/tiny/study.yaml", "--output_dir", str(tmp_path)]
    code, stderr = _signalled_when(
        command, lambda: any((tmp_path / "cells").glob("*.json")), signal.SIGTERM
    )
    assert not (tmp_path / "report.json").exists()  # it landed mid-study
    assert code == 143, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("ppq: study interrupted by SIGTERM; "), line
    assert f"cell(s) are in {tmp_path / 'cells'}" in line
    assert "again: the cells on disk are read, not recomputed" in line


# -- the exit of every subcommand, in process ---------------------------------------------


def _entry(monkeypatch, argv: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ppq", *argv])
    with pytest.raises(SystemExit) as exited:
        cli_main.entry()
    return exited.value.code


@pytest.mark.parametrize("subcommand", ["study", "sweep", "export"])
def test_an_exception_ends_every_own_subcommand_with_exit_1_and_a_line(
    monkeypatch, capsys, subcommand
):
    def fails(argv):
        raise RuntimeError("disk on fire\nsecond line")

    if subcommand == "sweep":
        monkeypatch.setattr(cli_main, "sweep_main", fails)
    else:
        monkeypatch.setitem(
            cli_main.OWN_SUBCOMMANDS, subcommand, (fails, cli_main.OWN_SUBCOMMANDS[subcommand][1])
        )
    assert _entry(monkeypatch, [subcommand, "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err  # a bug keeps its traceback
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"ppq: {subcommand} failed with RuntimeError: disk on fire; "), line
    assert f"run `ppq {subcommand} x.yaml` again" in line


@pytest.mark.parametrize("subcommand", ["study", "sweep", "export"])
def test_a_signal_ends_every_own_subcommand_with_128_plus_signum(monkeypatch, capsys, subcommand):
    def interrupted(argv):
        raise Interrupted(signal.SIGHUP)

    if subcommand == "sweep":
        monkeypatch.setattr(cli_main, "sweep_main", interrupted)
    else:
        monkeypatch.setitem(
            cli_main.OWN_SUBCOMMANDS,
            subcommand,
            (interrupted, cli_main.OWN_SUBCOMMANDS[subcommand][1]),
        )
    assert _entry(monkeypatch, [subcommand, "x.yaml"]) == 129
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"ppq: {subcommand} interrupted by SIGHUP; "), line


def test_lightnings_own_sigterm_exit_is_not_success(monkeypatch, capsys):
    """Lightning stops a Trainer that got SIGTERM with ``SIGTERMException``, a ``SystemExit``
    whose code is None (exit 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(argv, progress=None):
        raise SIGTERMException

    monkeypatch.setattr(cli_main, "main", stopped)
    assert _entry(monkeypatch, ["validate", "--config", "x.yaml"]) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("ppq: validate interrupted by SIGTERM; "), line


def test_a_config_error_still_exits_2_with_one_line(monkeypatch, capsys):
    def refused(argv, progress=None):
        raise PPQConfigError("bits=3 is not allowed")

    monkeypatch.setattr(cli_main, "main", refused)
    assert _entry(monkeypatch, ["fit", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["ppq: error: bits=3 is not allowed"]


def test_a_line_after_an_error_says_to_fix_it_before_running_again():
    """Rerunning a command that stopped on a configuration error ends the same way: the line
    says to fix it first (it said only "run ... again")."""
    from ppq_lightning.cli.outcome import RunProgress

    line = RunProgress(["export", "x.yaml"]).line("stopped", first="fix the error above")
    assert line.endswith("to resume: fix the error above, then run `ppq export x.yaml` again."), (
        line
    )
