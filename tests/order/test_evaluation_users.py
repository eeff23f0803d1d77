"""Evaluations between stages on users' own modules (#26, point 5 and "per-stage metrics are the
user's metrics"): they run on the dataloaders given to ``fit``/``validate`` or defined on the
module, report what the module logs in validation (accuracy, not only a loss) exactly as a plain
``validate`` reports it, and reach no logger but through ``stage/...``."""

import copy

import lightning as L
import pytest
import torch
import torchmetrics
import torchvision
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning.callbacks import (
    CompressionSchedule,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from tests.helpers import make_trainer

CLASSES = 10


class UserClassifier(L.LightningModule):
    """Written as users write one: a torchvision ResNet, a torchmetrics accuracy, and a
    validation_step that logs and returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class OwnData(UserClassifier):
    """The same module with its own dataloaders."""

    def train_dataloader(self):
        return images()

    def val_dataloader(self):
        return images(seed=1)


def images(n: int = 20, seed: int = 0, batch_size: int = 8) -> DataLoader:
    """Random images whose label is readable off a channel mean; 20 images in batches of 8
    (the last batch has 4: a logged mean is weighted by batch size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) * 40).long().clamp(-5, 4) + 5
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _stages() -> list:
    return [
        MagnitudePruning(0.5, b_orig=32, name="P"),
        RTNQuantization(bits=3, b_orig=32, name="Q"),
    ]


def _validate(tmp_path, model, loader=None, **kwargs) -> dict[str, float]:
    """What a plain ``validate`` reports for ``model``."""
    trainer = make_trainer(tmp_path / "plain", **kwargs)
    return trainer.validate(model, loader, verbose=False)[0]


@pytest.mark.parametrize("source", ["fit(val_dataloaders=...)", "module.val_dataloader()"])
def test_fit_evaluates_each_stage_on_the_fits_validation_data(tmp_path, source):
    model = UserClassifier() if source.startswith("fit") else OwnData()
    dense = copy.deepcopy(model)
    schedule = CompressionSchedule(_stages(), evaluate_each_stage=True)
    trainer = make_trainer(tmp_path, [schedule], max_steps=1, num_sanity_val_steps=0)
    if source.startswith("fit"):  # refused before: "pass val dataloaders" (they were passed)
        trainer.fit(model, train_dataloaders=images(), val_dataloaders=images(seed=1))
    else:
        trainer.fit(model)
    expected = _validate(tmp_path, dense, images(seed=1))
    assert set(schedule.dense_evaluation) == {"val_loss", "val_acc"}
    assert schedule.dense_evaluation == pytest.approx(expected, rel=1e-6)
    assert [set(r.evaluation) for r in schedule.results] == [{"val_loss", "val_acc"}] * 2


@pytest.mark.parametrize("source", ["validate(dataloaders=...)", "module.val_dataloader()"])
def test_validate_reports_per_stage_what_the_module_logs_as_validate_does(tmp_path, source):
    model = UserClassifier() if source.startswith("validate") else OwnData()
    loader = images(seed=1) if source.startswith("validate") else None
    schedule = CompressionSchedule(_stages(), evaluate_each_stage=True)
    reported = make_trainer(tmp_path, [schedule]).validate(model, loader, verbose=False)[0]
    # the last stage's evaluation is the compressed model's plain validation, to the last bit
    # (val_loss a mean over 8 + 8 + 4 images weighted by batch size, as Lightning weighs it)
    assert schedule.results[-1].evaluation == pytest.approx(reported, rel=1e-6)
    assert _validate(tmp_path, model, images(seed=1)) == reported
    row = schedule.rows()[-1]
    assert row["val_acc"] == pytest.approx(reported["val_acc"]) and "loss" not in row


def test_the_stage_evaluations_honour_limit_val_batches_as_validate_does(tmp_path):
    model, dense = UserClassifier(), UserClassifier()
    schedule = CompressionSchedule(_stages(), evaluate_each_stage=True)
    make_trainer(tmp_path, [schedule], limit_val_batches=2).validate(model, images(seed=1))
    expected = _validate(tmp_path, dense, images(seed=1), limit_val_batches=2)
    assert schedule.dense_evaluation == pytest.approx(expected, rel=1e-6)
    assert expected != _validate(tmp_path, dense, images(seed=1))  # two batches of three


class Recording(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append(dict(metrics))


def test_the_stage_evaluations_reach_the_loggers_only_under_stage_keys(tmp_path):
    logger = Recording()
    schedule = CompressionSchedule(_stages(), evaluate_each_stage=True, log_layers=False)
    trainer = make_trainer(tmp_path, [schedule], logger=logger)
    trainer.validate(UserClassifier(), images(seed=1), verbose=False)
    logged = [key for call in logger.calls for key in call]
    assert logged.count("val_acc") == 1  # the validation itself, once
    for stage in ("0_dense", "1_P", "2_Q"):
        assert f"stage/{stage}/val_acc" in logged
    assert set(trainer.callback_metrics) == {"val_loss", "val_acc"}


class EpochEndModule(UserClassifier):
    """Lightning 2's pattern: outputs kept in validation_step, logged and cleared at epoch end."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.outputs.append((self(x).argmax(-1) == y).float())

    def on_validation_epoch_end(self):
        self.log("val_acc", torch.cat(self.outputs).mean())
        self.outputs.clear()


def test_what_the_module_logs_at_epoch_end_is_reported_and_its_lists_are_cleared(tmp_path):
    model = EpochEndModule()
    schedule = CompressionSchedule(_stages(), evaluate_each_stage=True)
    reported = make_trainer(tmp_path, [schedule]).validate(model, images(seed=1), verbose=False)
    assert schedule.results[-1].evaluation == pytest.approx(reported[0], rel=1e-6)
    assert model.outputs == []


def test_a_module_that_logs_nothing_and_returns_no_loss_is_told_what_to_do(tmp_path):
    # BoringModel's validation_step returns {"x": loss} and logs nothing
    schedule = CompressionSchedule(
        [MagnitudePruning(0.5, targets="layer")], evaluate_each_stage=True
    )
    with pytest.raises(PPQConfigError, match=r"BoringModel.validation_step returned dict;.*log a"):
        make_trainer(tmp_path, [schedule]).validate(BoringModel(), verbose=False)


def test_the_printed_stage_table_shows_the_modules_accuracy(tmp_path, capsys):
    # ppq validate on a vision config printed loss but not accuracy (#26, point 10)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    model = ImageClassifierModule.from_model(net)
    schedule = CompressionSchedule(_stages(), evaluate_each_stage=True)
    make_trainer(tmp_path, [schedule]).validate(model, images(seed=1), verbose=False)
    header = next(line for line in capsys.readouterr().out.splitlines() if "stage" in line)
    assert {"acc", "acc5", "loss"} <= {cell.strip() for cell in header.split("┃")}


def test_a_schedule_with_a_training_stage_reports_the_users_metrics_in_fit(tmp_path):
    # the dense model is measured at setup (before QAT attaches its fake quantization), the
    # other rows at fit start and when training ends: all through the module's own logging
    model = UserClassifier()
    dense = copy.deepcopy(model)
    stages = [
        MagnitudePruning(0.5, b_orig=32, name="P"),
        QuantizationAwareTraining(bits=4, b_orig=32, name="Q"),
    ]
    schedule = CompressionSchedule(stages, evaluate_each_stage=True)
    trainer = make_trainer(tmp_path, [schedule], max_steps=1, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=images(), val_dataloaders=images(seed=1))
    assert schedule.dense_evaluation == pytest.approx(_validate(tmp_path, dense, images(seed=1)))
    assert [r.name for r in schedule.results] == ["P", "Q"]
    assert all(set(r.evaluation) == {"val_loss", "val_acc"} for r in schedule.results)
