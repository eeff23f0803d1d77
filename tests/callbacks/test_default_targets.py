"""Default targets leave a model's output layer and stem dense on any model: a user's
torchvision and timm ResNets, Lightning's demo Transformer (issue #26, point 8)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import timm
import torch
import torchmetrics
import torchvision
from lightning.pytorch.demos import LightningTransformer
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning.callbacks import (
    GPTQ,
    CompressionSchedule,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
)
from ppq_lightning.compressed.state import get_state
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import make_trainer


class UserClassifier(L.LightningModule):
    """A classifier written the way its author writes it: accuracy from torchmetrics."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.model = network
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x):
        return self.model(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.accuracy(self(x), y)
        self.log("val_acc", self.accuracy)


def _images() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,))
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(tmp_path, callbacks: list, steps: int | None = None) -> L.Trainer:
    return make_trainer(tmp_path, callbacks, max_steps=steps or -1)


NETWORKS = {
    "torchvision": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
    "timm": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
}


@pytest.mark.parametrize("family", list(NETWORKS))
@pytest.mark.parametrize("method", ["magnitude", "gptq"])
def test_a_users_resnet_keeps_its_stem_and_classifier_dense(family, method, tmp_path):
    torch.manual_seed(0)
    module = UserClassifier(NETWORKS[family]())
    if method == "magnitude":
        stage = MagnitudePruning(sparsity=0.5)
    else:
        stage = GPTQ(bits=4, num_calibration_batches=1)
    _trainer(tmp_path, [stage]).validate(module, _images(), verbose=False)
    assert get_state(module.model.conv1) is None and get_state(module.model.fc) is None
    assert get_state(module.model.layer1[0].conv1) is not None
    counted = resolve_targets(module)
    assert stage.result.summary.n_weights == sum(m.weight.numel() for m in counted.values())
    assert stage.result.summary.n_layers == len(counted) == 19


def test_a_schedules_rows_count_the_same_layers_from_the_dense_row_on(tmp_path):
    torch.manual_seed(0)
    module = UserClassifier(torchvision.models.resnet18(weights=None, num_classes=10))
    schedule = CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5), RTNQuantization(bits=4)], evaluate_each_stage=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [schedule]).validate(module, _images(), verbose=False)
    # the schedule's checks at setup, before the loop's data is reachable, warned "no data to
    # trace ... the default targets include them", and the stages then left them out
    assert not [w for w in caught if "no data to trace" in str(w.message)]
    rows = schedule.rows()
    assert [r["stage"] for r in rows] == ["0_dense", "1_magnitude", "2_rtn"]
    assert len({r["n_weights"] for r in rows}) == 1  # the stem and classifier never counted
    assert rows[0]["n_weights"] == sum(m.weight.numel() for m in resolve_targets(module).values())
    assert get_state(module.model.fc) is None


class Demo(LightningTransformer):
    def prepare_data(self) -> None:  # the demo downloads WikiText2 here
        pass


def test_the_demo_transformers_vocabulary_projection_is_not_adapted_or_pruned(tmp_path):
    torch.manual_seed(0)
    module = Demo(vocab_size=64)
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)

    def forward(model, batch):
        return model(*batch)

    lora = LoRAFineTune(r=2)
    lora.forward_fn = forward
    _trainer(tmp_path, [lora], steps=1).fit(module, loader)
    assert not isinstance(module.model.decoder, LoraLayer)
    assert isinstance(module.model.transformer.decoder.layers[0].linear1, LoraLayer)
    pruning = MagnitudePruning(sparsity=0.5)
    pruning.forward_fn = forward
    pruning.apply(module, dataloader=loader)
    assert get_state(module.model.decoder) is None
    assert (module.model.decoder.weight == 0).sum() == 0


def test_without_data_nothing_is_traced_and_every_layer_is_a_default_target():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"no data to trace Sequential's output layer and stem"):
        MagnitudePruning(sparsity=0.5).apply(network)  # no dataloader, no Trainer
    assert all(get_state(layer) is not None for layer in (network[0], network[2], network[3]))
    traced = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    MagnitudePruning(sparsity=0.5).apply(traced, dataloader=[torch.randn(2, 4)])
    assert [get_state(layer) is not None for layer in traced[::2]] == [False, True]
    assert get_state(traced[3]) is None
