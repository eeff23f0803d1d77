"""Data-parallel calibration: two gloo ranks on CPU give what one process gives on all batches."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ppq_lightning.calibration.distributed import all_reduce_mean, shard, world
from ppq_lightning.errors import PPQConfigError
from tests.helpers import TINY_LLAMA

N_BATCHES = 4


def batches() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, TINY_LLAMA["vocab_size"], (1, 32), generator=generator)}
        for _ in range(N_BATCHES)
    ]


def compress(method: str) -> dict:
    from ppq_lightning.callbacks import GPTQ, BlockRemoval, Wanda
    from ppq_lightning.models import CausalLMModule

    stage = {
        "gptq": lambda: GPTQ(bits=3, num_calibration_batches=N_BATCHES, log_layers=False),
        "wanda": lambda: Wanda(sparsity=0.5, num_calibration_batches=N_BATCHES, log_layers=False),
        "sleb": lambda: BlockRemoval(n_blocks=1, num_calibration_batches=N_BATCHES),
    }[method]()
    module = CausalLMModule(model_config={**TINY_LLAMA, "num_hidden_layers": 3}, seed=0)
    stage.apply(module, dataloader=batches())
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


METHODS = ("gptq", "wanda", "sleb")


def _rank(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        assert world() == (rank, size)
        assert len(shard(batches())) == N_BATCHES // size
        with pytest.raises(PPQConfigError, match=r"num_calibration_batches=1.*2 ranks"):
            shard([0])
        for method in METHODS:
            torch.save(compress(method), f"{out}/{method}{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every method on two gloo ranks (one spawn for all), each on half of the batches."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_match_one_process(two_ranks, method):
    ranks = [torch.load(two_ranks / f"{method}{r}.pt") for r in range(2)]
    single = compress(method)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key in single:
        # every rank solves the same all-reduced problem: identical weights
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        # and it is the problem of one process over all batches, up to summation order
        changed = (ranks[0][key] != single[key]).float().mean().item()
        assert changed < 0.01, (key, changed)


def test_without_a_group_everything_is_the_identity():
    mean = torch.randn(5)
    assert world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3]
    assert all_reduce_mean(mean, 7) == (mean, 7)
