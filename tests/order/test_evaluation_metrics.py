"""Evaluating between stages leaves a user's torchmetrics objects as a plain validate would
(#26, point 1: the next validate reported an accuracy averaged with the stages' evaluations)."""

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning.callbacks import CompressionSchedule, MagnitudePruning, RTNQuantization
from tests.helpers import make_trainer


class UserClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy(logits, y)
        self.log("val_acc", self.accuracy)
        return nn.functional.cross_entropy(logits, y)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_a_schedules_evaluations_leave_the_users_accuracy_alone(tmp_path):
    model = UserClassifier()
    targets = r"net\.[13]$"  # both layers, though they are the stem and the classifier
    stages = [
        MagnitudePruning(0.5, b_orig=32, targets=targets),
        RTNQuantization(bits=2, b_orig=32, targets=targets),
    ]
    schedule = CompressionSchedule(stages, evaluate_each_stage=True)
    reported = make_trainer(tmp_path / "a", [schedule]).validate(model, _loader(), verbose=False)
    # the compressed model validated again, with no evaluation between stages
    again = make_trainer(tmp_path / "b").validate(model, _loader(), verbose=False)
    assert reported[0]["val_acc"] == again[0]["val_acc"]
    # the stages report what the module logs: its accuracy
    assert len(schedule.results) == 2 and set(schedule.results[0].evaluation) == {"val_acc"}
