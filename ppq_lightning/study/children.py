"""Run a child process that never outlives its parent.

The local sweep runner starts one ``ppq`` process per grid point. :func:`run_child` starts it in
its own session (so a terminal's Ctrl-C reaches only the runner), forwards ``SIGINT``,
``SIGTERM`` and ``SIGHUP`` to it and then lets the runner die of the same signal, and on Linux
asks the kernel to send it ``SIGTERM`` should the runner be killed outright (``SIGKILL``,
``PR_SET_PDEATHSIG``): killing a sweep leaves no orphaned study running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_child(command: Sequence[str], env: dict[str, str], log: Path) -> int:
    """Run ``command`` with its stdout and stderr written to ``log``; return its exit code.

    Args:
        command: the program and its arguments.
        env: the child's environment.
        log: the file that receives everything the child prints.

    Raises:
        OSError: when the program cannot be started (missing, not executable).
    """
    linux = sys.platform.startswith("linux")
    received: list[int] = []
    with open(log, "w") as out:
        child = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if linux else None,
        )

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            child.send_signal(signum)

        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, forward) for s in FORWARDED} if main else {}
        try:
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if child.poll() is None:  # an exception in the runner: take the child with it
                child.kill()
                child.wait()
    if received:  # die as the runner would have without us in the way
        os.kill(os.getpid(), received[0])
    return code
