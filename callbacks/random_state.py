"""The global random state in checkpoints: a resumed ``fit`` draws what the uninterrupted one
draws (dropout, LoRA dropout, anything that uses ``torch``, ``random`` or ``numpy``'s global
generators).

Lightning restores a fit's loops, optimizers and a stateful dataloader's position, but not the
global random generators: a fit resumed from a checkpoint draws from whatever state the restart
left them in (``seed_everything`` at start, then model building and the other setup draws).
:class:`RandomStateCheckpoint` saves their state in every checkpoint (as callback state: taken
when the checkpoint is written) and puts it back before the first training batch of a fit
resumed from that checkpoint. ``ppq fit`` adds it to every Trainer; add it to your own Trainer
for the same guarantee.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class RandomStateCheckpoint(L.Callback):
    """Save the global random generators' state in each checkpoint and restore it when a fit
    resumes from one.

    Saved: ``torch`` (CPU, and every CUDA device's when CUDA is available), Python's ``random``
    and ``numpy``'s global generator, as they are when the checkpoint is written. Restored at
    the first ``on_train_batch_start`` of a fit resumed from that checkpoint, so that setup
    work of the restart (building the model, evaluating it) cannot shift what the next
    training batch draws. Generators that objects own (a dataloader's ``generator``) are not
    global: their owners save them (``torchdata``'s ``StatefulDataLoader`` saves its sampler's).

    In a multi-process run the checkpoint holds rank 0's state, which every rank gets back;
    the guarantee is for one process.

    Example::

        Trainer(callbacks=[RandomStateCheckpoint(), ModelCheckpoint(save_last=True)])
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The global random state now (Lightning calls this when it writes a checkpoint), in
        types a ``weights_only`` load reads (numpy's key as a tensor)."""
        name, keys, position, has_gauss, gauss = np.random.get_state()
        states: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        }
        if torch.cuda.is_available():
            states["torch.cuda"] = torch.cuda.get_rng_state_all()
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's random state for the first training batch of the resumed
        fit."""
        self._to_restore = state_dict.get("rng_states")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._to_restore is not None:
            states, self._to_restore = self._to_restore, None
            torch.set_rng_state(states["torch"])
            version, internal, gauss = states["python"]
            random.setstate((version, tuple(internal), gauss))
            name, keys, position, has_gauss, cached = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
            if "torch.cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["torch.cuda"])
