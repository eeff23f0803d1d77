"""The benchmark's data preparation: the same windows for every method, optionally reordered."""

import argparse
from pathlib import Path

import pytest
import torch

from tests.scripts.helpers import load_script

ROOT = Path(__file__).parents[2]


def _bench():
    return load_script("bench_methods")


def _windows(bench, tmp_path, seed):
    args = argparse.Namespace(
        model="smollm2-135m",
        random_weights=True,  # byte tokenizer: no model files needed
        seqlen=64,
        calibration_samples=8,
        eval_windows=2,
        cross_corpus=False,
        shuffle_seed=seed,
    )
    path = tmp_path / f"data_{seed}.pt"
    bench.make_data(args, path)
    return torch.load(path)


def test_shuffle_seed_reorders_the_same_calibration_windows(tmp_path):
    bench = _bench()
    plain, shuffled = _windows(bench, tmp_path, None), _windows(bench, tmp_path, 1)
    again = _windows(bench, tmp_path, 1)
    a, b = plain["calibration"], shuffled["calibration"]
    assert not torch.equal(a, b)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
    assert torch.equal(shuffled["calibration"], again["calibration"])
    assert torch.equal(plain["evaluation"], shuffled["evaluation"])


def test_shuffle_seed_values_are_seeds_or_none():
    bench = _bench()
    assert bench.shuffle_seed("none") is None
    assert bench.shuffle_seed("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=r"'x'.*integer seed or 'none'"):
        bench.shuffle_seed("x")


def test_spread_report_gives_every_order_mean_sd_and_paired_wins():
    bench = _bench()

    def run(ours_ppl, peer_ppl):
        rows = [{"method": "gptq4", "ppl": ours_ppl, "seconds": 2.0}]
        return rows, [{"ours": "gptq4", "ppl": peer_ppl, "seconds": 4.0}]

    text = bench.spread_report({"none": run(10.0, 11.0), "1": run(12.0, 11.0)})
    assert "2 orders of the same calibration windows (none, 1)" in text
    assert "| gptq4 | ours | 10.000 / 12.000 | 11.000 | 1.414 |" in text
    assert "| gptq4 | llm-compressor | 11.000 / 11.000 | 11.000 | 0.000 |" in text
    assert "| gptq4 | +0.000 (sd 1.414) | 1 of 2 | 0.50x |" in text


def test_spread_report_without_the_peer_has_no_comparison():
    bench = _bench()
    rows = [{"method": "rtn4", "ppl": 20.0, "seconds": 1.0}]
    text = bench.spread_report({"none": (rows, []), "1": (rows, [])})
    assert "| rtn4 | ours | 20.000 / 20.000 | 20.000 | 0.000 |" in text
    assert "ours <= peer" not in text


def test_ratios_give_the_time_of_the_block_passes_alone_against_the_peer():
    # 2 blocks, a floor of 10 s (one pass of both blocks): 3 passes cost 15 s
    rows = [
        {
            "method": "dense",
            "floor_seconds": 10.0,
            "block_passes": 0,
            "n_blocks": 2,
            "seconds": 0.0,
            "peak_mem_compress_mib": 1,
            "rss_before_compress_mib": 0,
        },
        {
            "method": "wanda50",
            "floor_seconds": None,
            "block_passes": 3,
            "n_blocks": 2,
            "seconds": 18.0,
            "peak_mem_compress_mib": 50,
            "rss_before_compress_mib": 10,
        },
    ]
    peer = [
        {
            "ours": "wanda50",
            "seconds": 30.0,
            "peak_mem_compress_mib": 90,
            "rss_before_compress_mib": 10,
        }
    ]
    (ratio,) = _bench().ratios(rows, peer, "cpu")
    assert ratio["time"] == pytest.approx(0.6)
    assert ratio["time_passes"] == pytest.approx(0.5)
    assert ratio["memory"] == pytest.approx(0.5)
