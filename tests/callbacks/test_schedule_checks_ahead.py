"""A schedule refuses a later stage before its first stage changes any weight: stages that
trace the model (DepGraph pruning, BatchNorm folding) are checked on the first batch too, and a
calibrated stage whose targets the forward never calls is refused up front."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ppq_lightning import PPQConfigError
from ppq_lightning.callbacks import (
    GPTQ,
    CompressionSchedule,
    DepGraphPruning,
    FoldBatchNorm,
    MagnitudePruning,
)
from tests.helpers import make_trainer
from tests.user_modules import modules


class Images(Dataset):
    """Batches as dicts the default forward cannot map onto ``forward(x)``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.randn(3, 32, 32), "label": i % 10}


class DictClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(num_classes=10)

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch["image"]), batch["label"]))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("later", [lambda: DepGraphPruning(ratio=0.2), FoldBatchNorm])
def test_a_tracing_stage_that_cannot_call_the_model_is_refused_before_pruning(later, tmp_path):
    model = DictClassifier()
    before = weights(model)
    schedule = CompressionSchedule(stages=[MagnitudePruning(sparsity=0.5), later()])
    with pytest.raises(PPQConfigError, match="no stage was applied"):
        make_trainer(tmp_path, [schedule]).validate(model, DataLoader(Images(), batch_size=4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class WithUnusedLayer(modules.UserClassifier):
    """A classifier with a layer its forward never calls."""

    def __init__(self) -> None:
        super().__init__("timm_resnet10t")
        self.aux = nn.Linear(10, 10)


def test_a_calibrated_stage_whose_target_never_runs_is_refused_before_pruning(tmp_path):
    model = WithUnusedLayer()
    before = weights(model)
    schedule = CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5), GPTQ(bits=4, num_calibration_batches=1)]
    )
    with pytest.raises(PPQConfigError, match=r"targets aux, which the model's forward never"):
        make_trainer(tmp_path, [schedule]).validate(model, modules.images())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
