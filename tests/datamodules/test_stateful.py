"""A fit over ``shuffled_dataloader`` resumed from the checkpoint of any step reads the batches
the uninterrupted fit reads and ends with its weights, an epoch's last step included (with and
without ``limit_train_batches``, with validation at every epoch's end)."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset

from ppq_lightning.datamodules.stateful import ordered_dataloader, shuffled_dataloader

STEPS = 8


def _equal(a, b) -> bool:
    """Nested checkpoint values equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _position(states: list[dict]) -> list[dict]:
    """The loaders' saved states without the workers' base seed (drawn from the loader's
    generator for each new iterator, which a resume does not restore: docs/reliability.md)."""
    return [
        {
            **s,
            "_snapshot": {
                **s["_snapshot"],
                "_main_snapshot": {
                    k: v for k, v in s["_snapshot"]["_main_snapshot"].items() if k != "_base_seed"
                },
            },
        }
        if "_snapshot" in s
        else s
        for s in states
    ]


class Indexed(torch.utils.data.Dataset):
    """Distinct rows, each carrying its index (so the test sees which sample was read)."""

    def __init__(self, n: int) -> None:
        self.data = RandomDataset(32, n).data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i], i


class Recording(BoringModel):
    """Lightning's BoringModel trained on a shuffled stateful loader; records the sample
    indices of every training batch."""

    def __init__(self, samples: int, batch_size: int, workers: int) -> None:
        super().__init__()
        self.samples, self.batch_size, self.workers, self.read = samples, batch_size, workers, []

    def training_step(self, batch, batch_idx):
        x, index = batch
        self.read.append(index.tolist())
        return super().training_step(x, batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step(batch[0], batch_idx)

    def train_dataloader(self):
        return shuffled_dataloader(
            Indexed(self.samples), seed=3, batch_size=self.batch_size, num_workers=self.workers
        )

    def val_dataloader(self):
        return ordered_dataloader(Indexed(4), batch_size=2)


def _fit(folder, samples, batch_size, limit, workers, ckpt_path=None) -> tuple[Recording, dict]:
    seed_everything(0)
    model = Recording(samples, batch_size, workers)
    trainer = Trainer(
        max_steps=STEPS,
        limit_train_batches=limit,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        ],
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    final = torch.load(folder / f"step={STEPS}.ckpt", weights_only=True, map_location="cpu")
    return model, final


@pytest.mark.parametrize(
    ("samples", "batch_size", "limit", "workers"),
    [(7, 1, 3, 0), (5, 2, None, 0), (7, 1, 3, 1)],
    ids=["limit_train_batches", "whole_epochs", "worker"],
)
def test_a_resume_from_any_step_reads_and_ends_as_the_uninterrupted_fit(
    tmp_path, samples, batch_size, limit, workers
):
    """Epochs of 3 batches (the loader cut by limit_train_batches=3, or 5 samples in batches of
    2), 8 steps: a resume from steps 3 and 6 (an epoch's last) used to carry the finished
    epoch's position into the next one and skip its first batches."""
    clean, final = _fit(tmp_path / "clean", samples, batch_size, limit or 1.0, workers)
    assert len({tuple(map(tuple, clean.read[i : i + 3])) for i in (0, 3)}) == 2  # reshuffled
    for step in range(1, STEPS):
        folder = tmp_path / f"from_{step}"
        ckpt = tmp_path / "clean" / f"step={step}.ckpt"
        resumed, resumed_final = _fit(folder, samples, batch_size, limit or 1.0, workers, ckpt)
        assert resumed.read == clean.read[step:], f"resumed from step {step}"
        for key in ("state_dict", "optimizer_states"):
            assert _equal(resumed_final[key], final[key]), (step, key)
        loader, expected = (
            _position(f["loops"]["fit_loop"]["state_dict"]["combined_loader"])
            for f in (resumed_final, final)
        )
        assert loader == expected, (step, loader, expected)
