"""Fault injection: ``ppq study`` and ``ppq sweep`` killed with SIGKILL in the middle of a run (a
seeded draw of how many new cells are on disk when the kill lands) finish, when run again, with
the report an uninterrupted run writes (timings and the cache budget aside: a resumed run reads
cells instead of computing them), and the cells written before a kill are read, not recomputed.

Each kill is checked to have landed: the process died of SIGKILL (it had not finished), some
but not all cells were on disk and no report was written. A tiny study writes a cell every
~20 ms once its model is loaded, so the kill waits for the cell files (polled every ms), not
for a time."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
PPQ = [sys.executable, "-m", "ppq_lightning.cli.main"]
VARYING = {
    "seconds",
    "eval_seconds",
    "cached",
    "evaluations",
    "applications",
    "applications_without_reuse",
}
KILLS = 2  # two kills per study, each after 1 or 2 new cells


def _run(command: list[str]) -> None:
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)


def _cells(folder: Path) -> dict[str, bytes]:
    """The cell files on disk (name -> bytes)."""
    return {path.name: path.read_bytes() for path in sorted((folder / "cells").glob("*.json"))}


def _killed_when(command: list[str], ready) -> None:
    """Start ``command``, SIGKILL it as soon as ``ready()`` holds, and check that the kill is
    what ended it (the process had not finished before)."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.001)
    process.kill()
    code = process.wait()
    time.sleep(0.5)  # a SIGKILLed sweep's point dies of PDEATHSIG: let it go
    assert code == -signal.SIGKILL, f"{command} ended with {code} before the kill"


def _killed_after_new_cells(command: list[str], folder: Path, new: int, total: int) -> int:
    """Run ``command`` until ``new`` more cells are in ``folder`` and SIGKILL it there; check
    that the kill landed mid-run (some but not all of the ``total`` cells on disk) and return
    how many cells it left."""
    at = len(_cells(folder)) + new
    assert at < total, "the study has too few cells for this kill"
    _killed_when(command, lambda: len(_cells(folder)) >= at)
    left = len(_cells(folder))
    assert at <= left < total
    return left


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VARYING} for row in rows]


def _study_report(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    return {
        key: _stable(value) if isinstance(value, list) else value for key, value in report.items()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    _run([*PPQ, "study", "--config", "configs/tiny/study.yaml", "--output_dir", str(folder)])
    report = json.loads((folder / "report.json").read_text())
    assert report["studies"][0]["cached"] == 0
    return _study_report(folder), len(_cells(folder))


def test_a_study_killed_mid_run_ends_with_the_uninterrupted_report(tmp_path, reference):
    report, total = reference
    command = [*PPQ, "study", "--config", "configs/tiny/study.yaml", "--output_dir", str(tmp_path)]
    rng = random.Random(16)
    for _ in range(KILLS):
        _killed_after_new_cells(command, tmp_path, rng.randint(1, 2), total)
        assert not (tmp_path / "report.json").exists()
    before = _cells(tmp_path)
    _run(command)
    assert _study_report(tmp_path) == report
    after = _cells(tmp_path)
    assert len(after) == total
    assert {name: after[name] for name in before} == before  # read again, not rewritten
    resumed = json.loads((tmp_path / "report.json").read_text())["studies"][0]
    assert resumed["cached"] == len(before)


def test_a_sweep_killed_mid_run_ends_with_the_uninterrupted_table(tmp_path, reference):
    report, total = reference
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"

    def sweep(folder: Path) -> Path:
        """A sweep whose points log to W&B (what `ppq sweep` reads) and report to
        ``folder/<run id>``, sharing the cells in ``folder/cells``."""
        path = tmp_path / f"{folder.name}.yaml"
        command = [*PPQ, "study", "--config", "configs/tiny/study.yaml"]
        command += ["--config", "configs/loggers/study_wandb.yaml", f"--output_dir={folder}"]
        path.write_text(
            yaml.safe_dump(
                {
                    "method": "grid",
                    "metric": {"name": "result/ppl", "goal": "minimize"},
                    "parameters": {"search": {"values": ["exhaustive", "pih"]}},
                    "command": [*command, "${args}"],
                }
            )
        )
        return path

    def study(folder: Path, row: dict) -> dict:
        return json.loads((folder / row["id"] / "report.json").read_text())["studies"][0]

    def stable(rows: list[dict]) -> list[dict]:  # ids hash the commands, which name the folders
        varying = {"id", "result/evaluations", "result/applications"}
        return [{k: v for k, v in row.items() if k not in varying} for row in rows]

    _run([*PPQ, "sweep", str(sweep(clean)), "--output", str(clean)])
    command = [*PPQ, "sweep", str(sweep(faulty)), "--output", str(faulty)]

    def done() -> list[Path]:
        return sorted(faulty.glob("points/*/point.json"))

    # in the middle of the first point (the exhaustive study; its process dies with the sweep)
    first = _killed_after_new_cells(command, faulty, random.Random(17).randint(1, 3), total)
    assert not done()
    # between the points: the first one finished, the second not
    _killed_when(command, lambda: len(done()) >= 1)
    (finished,) = done()
    record = finished.read_bytes()
    assert not (faulty / "sweep.json").exists()
    cells = _cells(faulty)
    _run(command)
    table = [json.loads((f / "sweep.json").read_text()) for f in (clean, faulty)]
    assert "error" not in table[0][0] and stable(table[0]) == stable(table[1])
    assert study(clean, table[0][0])["best_order"] == report["studies"][0]["best_order"]
    assert finished.read_bytes() == record  # the finished point was not run again
    assert _cells(faulty) == cells
    # the first point, resumed by the second run, read the cells the first kill left
    assert study(clean, table[0][0])["cached"] == 0
    assert study(faulty, table[1][0])["cached"] == first
