"""``forward_fn`` is how every stage and predictor that runs the model calls it (#25): a user's
LightningModule whose batches are dicts the default forward cannot read."""

import lightning as L
import pytest
import torch
import torchmetrics
import torchvision
from torch import nn

from ppq_lightning.callbacks.registry import build_stage
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.interference import interference_ranking


class UserClassifier(L.LightningModule):
    """Written the way a user writes one: batches are {"image": ..., "label": ...}."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(num_classes=10)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def validation_step(self, batch, batch_idx):
        self.accuracy(self(batch["image"]), batch["label"])
        self.log("val_acc", self.accuracy)


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(4, 3, 32, 32, generator=generator), "label": torch.arange(4)}
        for _ in range(n)
    ]


def _forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["image"])


SPECS = [
    "wanda:0.5",
    "sparsegpt:0.5",
    "gptq:4",
    "depgraph:0.25",
    "bn",
    "fold",
    "joint:6,b_orig=32,score_batches=1,channels=depgraph",
]


@pytest.mark.parametrize("spec", SPECS)
def test_every_stage_that_runs_the_model_calls_it_through_forward_fn(spec):
    extra = {} if "b_orig" in spec else {"b_orig": 32}
    with pytest.raises(PPQConfigError, match="batch is a dict"):  # the model needs it
        build_stage(spec, num_calibration_batches=2, **extra).apply(
            UserClassifier(), dataloader=_batches()
        )
    stage = build_stage(spec, num_calibration_batches=2, **extra)
    stage.forward_fn = _forward
    result = stage.apply(UserClassifier(), dataloader=_batches())
    assert result.summary.n_weights > 0


@pytest.mark.parametrize("score", ["interference", "calibration_kl"])
def test_the_predictors_call_the_model_through_forward(score):
    stages = [build_stage("magnitude:0.5", name="P"), build_stage("rtn:4", name="Q", b_orig=32)]
    with pytest.raises(PPQConfigError, match="batch is a dict"):
        interference_ranking(UserClassifier(), stages, _batches(), score=score)
    ranking = interference_ranking(
        UserClassifier(), stages, _batches(), score=score, forward=_forward
    )
    assert sorted(order for order, _ in ranking.orders) == [("P", "Q"), ("Q", "P")]
