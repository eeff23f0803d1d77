"""The benchmark's data preparation: the same windows for every method, optionally reordered."""

import argparse
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
