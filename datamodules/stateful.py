"""Train dataloaders that a resumed ``fit`` continues exactly.

Lightning saves the state of a train dataloader that has ``state_dict``/``load_state_dict`` in
every checkpoint (``_FitLoop.on_save_checkpoint``) and gives it back before a resumed fit
iterates it; a plain ``DataLoader`` restarts the epoch from its first batch instead.
:func:`shuffled_dataloader` builds torchdata's ``StatefulDataLoader`` (a drop-in
``DataLoader`` with that state) over torchdata's ``StatefulDistributedSampler``: epoch ``e``
is the permutation ``randperm(n)`` of a generator seeded with ``seed + e`` (Lightning calls
the sampler's ``set_epoch`` at every epoch start), and the state is how far the epoch got. A
resumed fit therefore reads, from the next batch on, exactly what the uninterrupted fit reads,
in this epoch and the next ones, whatever random numbers were drawn in between.

Evaluation and calibration loaders (:func:`ordered_dataloader`) own a generator, so that making
their iterators (which draws a seed) never moves the global random generator that training's
dropout draws from.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler


def shuffled_dataloader(dataset: Dataset, seed: int, **kwargs: Any) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over ``dataset`` shuffled per epoch from ``seed``.

    Under ``torch.distributed`` each rank reads its shard (as Lightning's own distributed
    sampler would); in one process, all of ``dataset``.

    Args:
        dataset: a map-style dataset.
        seed: the shuffle's seed (epoch ``e`` uses ``seed + e``).
        **kwargs: other ``DataLoader`` arguments (``batch_size``, ``num_workers``, ...).
    """
    distributed = dist.is_available() and dist.is_initialized()
    sampler = StatefulDistributedSampler(
        dataset,
        num_replicas=dist.get_world_size() if distributed else 1,
        rank=dist.get_rank() if distributed else 0,
        shuffle=True,
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)  # worker seeds, not the global generator
    with warnings.catch_warnings():  # torchdata calls torch.set_vital, deprecated in torch 2.8
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, sampler=sampler, generator=generator, **kwargs)


def ordered_dataloader(dataset: Dataset, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` in order, with its own generator (see the module's
    docstring).

    Args:
        dataset: the dataset.
        **kwargs: other ``DataLoader`` arguments (``batch_size``, ``num_workers``, ...).
    """
    return DataLoader(dataset, generator=torch.Generator().manual_seed(0), **kwargs)
