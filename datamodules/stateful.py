"""Train dataloaders that a resumed ``fit`` continues exactly.

Lightning saves the state of a train dataloader that has ``state_dict``/``load_state_dict`` in
every checkpoint (``_FitLoop.on_save_checkpoint``) and gives it back before a resumed fit
iterates it; a plain ``DataLoader`` restarts the epoch from its first batch instead.
:func:`shuffled_dataloader` builds torchdata's ``StatefulDataLoader`` (a drop-in
``DataLoader`` with that state) over torchdata's ``StatefulDistributedSampler``: epoch ``e``
is the permutation ``randperm(n)`` of a generator seeded with ``seed + e`` (Lightning calls
the sampler's ``set_epoch`` at every epoch start), and the state is how far the epoch got. A
resumed fit therefore reads, from the next batch on, exactly what the uninterrupted fit reads,
in this epoch and the next ones, whatever random numbers were drawn in between. The sampler
(:class:`EpochSampler`) saves its epoch with its position: a checkpoint written at an epoch's
last batch (Lightning resumes with the next epoch) starts that next epoch at its first batch
(:class:`EpochDataLoader`) instead of skipping as many batches as the finished epoch had read.

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
    sampler = EpochSampler(
        dataset,
        num_replicas=dist.get_world_size() if distributed else 1,
        rank=dist.get_rank() if distributed else 0,
        shuffle=True,
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)  # worker seeds, not the global generator
    with warnings.catch_warnings():  # torchdata calls torch.set_vital, deprecated in torch 2.8
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return EpochDataLoader(dataset, sampler=sampler, generator=generator, **kwargs)


class EpochSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` whose state names its epoch.

    The saved position (``yielded``) belongs to one epoch's permutation. Restored, it puts the
    sampler back in that epoch (so an iterator made before the loop calls :meth:`set_epoch`,
    e.g. one whose workers prefetch, reads the right permutation); when the loop then sets
    another epoch (a checkpoint written after an epoch's last batch: Lightning goes on with the
    next epoch), the position is dropped and the loader that owns the sampler restarts its
    iterator, so that epoch starts at its first batch, as it does in the uninterrupted run.
    Without this, the next epoch skipped as many samples as the finished one had yielded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restored_epoch: int | None = None
        self.on_epoch_change: Any = None  # set by EpochDataLoader

    def state_dict(self) -> dict[str, Any]:
        """The position in the epoch and the epoch."""
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict``'s position in its epoch (a state without an epoch, from
        torchdata's sampler, resumes at its position in whatever epoch is set)."""
        super().load_state_dict(state_dict)
        if "epoch" in state_dict:
            self.restored_epoch = self.epoch = int(state_dict["epoch"])

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; another epoch than a restored position's drops that position (see
        the class docstring)."""
        restored, self.restored_epoch = self.restored_epoch, None
        super().set_epoch(epoch)
        if restored is not None and epoch != restored:
            self.next_yielded = None
            if self.on_epoch_change is not None:
                self.on_epoch_change()


class EpochDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` over an :class:`EpochSampler`: when a restored
    position turns out to belong to an epoch the loop has left, its iterator starts the set
    epoch afresh (counters included, as a new iterator would)."""

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        sampler.on_epoch_change = self._restart_epoch

    def _restart_epoch(self) -> None:
        self.next_iter_state = None  # not iterated yet: the next iterator starts afresh
        if self._iterator is not None and not self._iterator._finished:
            self._iterator._reset(self)  # torchdata's start of a new epoch on a live iterator


def ordered_dataloader(dataset: Dataset, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` in order, with its own generator (see the module's
    docstring).

    Args:
        dataset: the dataset.
        **kwargs: other ``DataLoader`` arguments (``batch_size``, ``num_workers``, ...).
    """
    return DataLoader(dataset, generator=torch.Generator().manual_seed(0), **kwargs)
