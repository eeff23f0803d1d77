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
from ppq_lightning.models.loading import load_causal_lm
from ppq_lightning.order.interference import interference_ranking
from tests.helpers import TINY_LLAMA, token_batches


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
    model = UserClassifier()
    result = stage.apply(model, dataloader=_batches())
    assert result.summary.n_weights > 0
    # channel pruning never prunes what the model predicts: still 10 classes (the module has
    # no default_ignore; its classifier is found as the layer that makes the model's output)
    assert model(_batches(1)[0]["image"]).shape == (4, 10)


@pytest.mark.parametrize("score", ["interference", "calibration_kl"])
def test_the_predictors_call_the_model_through_forward(score):
    stages = [build_stage("magnitude:0.5", name="P"), build_stage("rtn:4", name="Q", b_orig=32)]
    with pytest.raises(PPQConfigError, match="batch is a dict"):
        interference_ranking(UserClassifier(), stages, _batches(), score=score)
    ranking = interference_ranking(
        UserClassifier(), stages, _batches(), score=score, forward=_forward
    )
    assert sorted(order for order, _ in ranking.orders) == [("P", "Q"), ("Q", "P")]


class UserLM(L.LightningModule):
    """A user's module around an HF causal LM; batches are {"tokens": ...}."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = load_causal_lm(config={**TINY_LLAMA, "num_hidden_layers": 2}, seed=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens).logits


def _token_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["token_ids"])


@pytest.mark.parametrize(
    "spec", ["channels:0.25", "block_removal,n_blocks=1", "sharing:0.8,group_size=2,whiten=true"]
)
def test_llm_stages_call_a_users_module_through_forward_fn(spec):
    # the forward takes `tokens`; the batch names them `token_ids`: no key to match by name
    batches = [{"token_ids": ids} for ids in token_batches(2)]
    with pytest.raises(PPQConfigError, match="batch is a dict"):
        build_stage(spec, num_calibration_batches=2).apply(UserLM(), dataloader=batches)
    stage = build_stage(spec, num_calibration_batches=2, forward_fn=_token_forward)
    assert stage.apply(UserLM(), dataloader=batches).summary.n_weights > 0
