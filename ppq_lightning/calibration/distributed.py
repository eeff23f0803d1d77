"""Data-parallel calibration: each rank sees a shard of the calibration set, statistics are
all-reduced before every solve, so every rank solves the same problem and keeps the same weights.

Works under any ``torch.distributed`` process group, so under Lightning's DDP strategies
(``Trainer(strategy="ddp", devices=N)``), which create one; outside a group everything here is
the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ppq_lightning.errors import PPQConfigError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: Sequence[T], what: str = "calibration batches") -> list[T]:
    """This rank's share of ``batches`` (every ``world_size``-th batch, from its rank on).

    Raises:
        PPQConfigError: when there are fewer batches than ranks.
    """
    rank, size = world()
    if size == 1:
        return list(batches)
    if len(batches) < size:
        raise PPQConfigError(
            f"num_calibration_batches={len(batches)}: data-parallel calibration over {size} "
            f"ranks needs at least {size} {what}, one per rank."
        )
    return list(batches[rank::size])


def reduce_device() -> torch.device:
    """Where collectives of the current group run: CUDA for NCCL, CPU otherwise."""
    if world()[1] > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(mean: Tensor, count: int) -> tuple[Tensor, int]:
    """Combine per-rank means of ``count`` rows each into the mean over all ranks' rows.

    Returns:
        ``(global mean, global count)``; the same on every rank (float32 statistics are summed
        in float64, so the result does not depend on the number of ranks beyond rounding).
    """
    if world()[1] == 1:
        return mean, count
    device = reduce_device()
    total = mean.to(device, torch.float64) * count
    n = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    dist.all_reduce(n)
    return (total / n).to(mean.device, mean.dtype), int(n.item())
