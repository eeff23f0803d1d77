"""How a ``ppq`` command ends: signals, exit codes and the line that says what was done.

A command that a signal ends (``SIGTERM`` from a batch scheduler's preemption, ``SIGINT`` from
Ctrl-C, ``SIGHUP`` from a closed terminal) or that an exception ends never exits 0. While
:func:`signals_raise` is active, the first of those signals raises :class:`Interrupted` in the
main thread at once: the command unwinds as it would from an exception (Lightning calls its
``on_exception`` hooks, a stage being applied is rolled back, atomic writes leave the old file),
and ``ppq`` exits ``128 + signum`` (143 for ``SIGTERM``, 130 for ``SIGINT``, 129 for
``SIGHUP``). A second signal of the same kind during that unwinding ends the process at once
(the signal's default action), as a second Ctrl-C does elsewhere.

Before exiting, ``ppq`` prints one line on stderr (:meth:`RunProgress.line`): what the command
had done (the stages applied, the global step, the last checkpoint written, the cells measured)
and how to resume (``--ckpt_path .../last.ckpt``, or the same command again).
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that end a ``ppq`` command with a report instead of silently."""


class Interrupted(BaseException):
    """A signal ended the command. A ``BaseException`` (like ``KeyboardInterrupt``), so that
    ``except Exception`` blocks do not swallow it, and not a ``KeyboardInterrupt``, which
    Lightning turns into ``sys.exit(1)``.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {self.name}")

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``"SIGTERM"``."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """``128 + signum``: the shell's convention for a command a signal ended."""
        return 128 + self.signum


_received: list[int] = []


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """The handler of :data:`SIGNALS`: raise :class:`Interrupted` for the first signal; a
    second one takes its default action (the process ends at once)."""
    if _received:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, the first ``SIGINT``/``SIGTERM``/``SIGHUP`` raises
    :class:`Interrupted` in the main thread; the previous handlers are back afterwards.

    Lightning's signal connector keeps this handler: during a Trainer run it calls its own
    ``SIGTERM`` notifier, then this one. Outside the main thread nothing is installed.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _raise_interrupted) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class RunProgress:
    """What a ``ppq`` command has done so far, for the line printed when it does not finish.

    Attributes:
        argv: the command line after ``ppq``.
        trainer: the Trainer of ``fit``/``validate``/``test``/``predict`` once built.
        notes: what an own subcommand reports about itself (``{"cells": folder}``).
    """

    argv: list[str]
    trainer: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def subcommand(self) -> str:
        return self.argv[0] if self.argv else ""

    def command(self, *extra: str) -> str:
        """The command again (``ppq`` and its arguments, shell-quoted), with ``extra``
        arguments appended."""
        return shlex.join(["ppq", *self.argv, *extra])

    def line(self, ended: str, first: str | None = None) -> str:
        """One line: how the command ended (``ended``), what it had done, how to resume.

        Args:
            ended: how the command ended, e.g. ``"interrupted by SIGTERM"``.
            first: what to do before resuming, when running it again as it was would end the
                same way (``"fix the error above"``, ``"free space on the disk"``).
        """
        sub = self.subcommand or "ppq"
        if self.trainer is not None:
            done, resume = self._trainer_progress()
        elif sub == "study":
            done, resume = self._study_progress()
        elif sub == "sweep":
            done = "finished points keep their point.json under the sweep's --output"
            resume = f"run `{self.command()}` again: finished points are reused, not rerun"
        elif sub == "export":
            done = "the export did not complete"
            resume = f"run `{self.command()}` again"
        else:
            done = "nothing was run"
            resume = f"run `{self.command()}` again"
        if first is not None:
            resume = f"{first}, then {resume}"
        return f"ppq: {sub} {ended}; {done}; to resume: {resume}."

    def _study_progress(self) -> tuple[str, str]:
        cells = self.notes.get("cells")
        if cells is None:
            done = "no cell was measured"
        else:
            n = len(list(Path(cells).glob("*.json"))) if Path(cells).is_dir() else 0
            done = f"{n} cell(s) are in {cells}"
        return done, (f"run `{self.command()}` again: the cells on disk are read, not recomputed")

    def _trainer_progress(self) -> tuple[str, str]:
        # imported here: the layers below cli import nothing from it, and `ppq --help` stays fast
        from ppq_lightning.callbacks.base import configured_stages

        trainer = self.trainer
        fn = trainer.state.fn.value if trainer.state.fn is not None else self.subcommand
        model = trainer.lightning_module
        parts = []
        stages = configured_stages(trainer.callbacks)
        if stages and model is not None:
            applied = [s.name for s in stages if s.already_applied(model)]
            pending = [s.name for s in stages if s.name not in applied]
            parts.append(
                f"stages applied: {', '.join(applied) or 'none'}"
                + (f" (not applied: {', '.join(pending)})" if pending else "")
            )
        if fn == "fit":
            parts.append(f"epoch {trainer.current_epoch}, global step {trainer.global_step}")
            last = self._last_checkpoint()
            if last is None:
                parts.append("no checkpoint was written")
                why = (
                    "no checkpoint had been written yet"
                    if self.trainer.checkpoint_callbacks
                    else "a ModelCheckpoint in trainer.callbacks makes a fit resumable mid-run"
                )
                resume = f"run `{self.command()}` again (it starts over; {why})"
            else:
                parts.append(f"last checkpoint: {last}")
                argv = _without_option(self.argv, "--ckpt_path")
                resume = f"`{shlex.join(['ppq', *argv, '--ckpt_path', last])}`"
        else:
            resume = f"run `{self.command()}` again (`{fn}` starts over)"
        return ", ".join(parts) or "nothing was run", resume

    def _last_checkpoint(self) -> str | None:
        """The newest checkpoint file a ModelCheckpoint of the Trainer wrote (``last.ckpt``
        when it keeps one), if any is on disk."""
        written = []
        for callback in self.trainer.checkpoint_callbacks:
            for path in (
                getattr(callback, "last_model_path", ""),
                getattr(callback, "_last_checkpoint_saved", ""),
                getattr(callback, "best_model_path", ""),
            ):
                if path and os.path.isfile(path):
                    written.append(path)
        if not written:
            return None
        return max(written, key=lambda p: (os.path.getmtime(p), p.endswith("last.ckpt")))


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` (``--option value`` or ``--option=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


PROGRESS: ContextVar[RunProgress | None] = ContextVar("ppq_progress", default=None)
"""The progress of the ``ppq`` command running in this context (set by ``ppq``'s entry)."""


def note_progress(**notes: Any) -> None:
    """Record what an own subcommand has done so far (e.g. ``cells=folder``) for the line
    printed if it does not finish; nothing when no ``ppq`` command is running."""
    progress = PROGRESS.get()
    if progress is not None:
        progress.notes.update(notes)
