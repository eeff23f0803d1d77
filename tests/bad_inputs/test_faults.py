"""Fault injection: ``ppq study`` and ``ppq sweep`` killed with SIGKILL at random moments (a
seeded draw, a bounded number of kills and seconds) finish, when run again, with the report an
uninterrupted run writes (timings and the cache budget aside: a resumed run reads cells
instead of computing them)."""

import json
import random
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
KILLS, WINDOW = 2, (3.0, 12.0)  # two kills per test, each 3-12 s after its start


def _run(command: list[str]) -> None:
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)


def _killed(command: list[str], rng: random.Random) -> None:
    """Start ``command`` and SIGKILL it after a random delay (if it is still running)."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    delay = rng.uniform(*WINDOW)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    time.sleep(0.5)  # a SIGKILLed sweep's point dies of PDEATHSIG: let it go


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
    return _study_report(folder)


def test_a_study_killed_at_random_points_ends_with_the_uninterrupted_report(tmp_path, reference):
    command = [*PPQ, "study", "--config", "configs/tiny/study.yaml", "--output_dir", str(tmp_path)]
    rng = random.Random(16)
    for _ in range(KILLS):
        _killed(command, rng)
    _run(command)
    assert _study_report(tmp_path) == reference


def test_a_sweep_killed_at_random_points_ends_with_the_uninterrupted_table(tmp_path, reference):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "parameters": {"search": {"values": ["exhaustive", "pih"]}},
                "command": [
                    *PPQ,
                    "study",
                    "--config",
                    "configs/tiny/study.yaml",
                    "${args}",
                ],
            }
        )
    )
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    _run([*PPQ, "sweep", str(sweep), "--output", str(clean)])
    rng = random.Random(17)
    for _ in range(KILLS):
        _killed([*PPQ, "sweep", str(sweep), "--output", str(faulty)], rng)
    _run([*PPQ, "sweep", str(sweep), "--output", str(faulty)])
    table = [_stable(json.loads((f / "sweep.json").read_text())) for f in (clean, faulty)]
    assert table[0] == table[1]
    assert table[0][0]["best_order"] == reference["studies"][0]["best_order"]
