"""scripts/bench_resume.py at a tiny width: a GPTQ run killed with SIGKILL at a random block and
run again ends bit-identical to an uninterrupted run, and the report says so."""

import json

from tests.scripts.helpers import load_script


def test_a_sigkilled_gptq_run_resumes_bit_identical(tmp_path):
    bench = load_script("bench_resume")
    summary = bench.main(
        [
            "--hidden=64",
            "--mlp=128",
            "--heads=4",
            "--kv-heads=2",
            "--vocab=256",
            "--group-size=32",
            "--blocks=3",
            "--seqlen=32",
            "--seed=1",
            f"--output={tmp_path}",
        ]
    )
    assert summary["bit_identical"] and summary["state_entries_differing"] == 0
    assert 1 <= summary["killed_with_blocks_on_disk"] <= 2
    assert summary["resumed_blocks"] == summary["killed_with_blocks_on_disk"]
    assert summary["progress_left_after_success"] == []
    assert summary["block_file_bytes_per_block"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "bench_resume.py" in (tmp_path / "README.md").read_text()
