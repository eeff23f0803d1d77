"""Evaluation between stages (ppq_lightning.order.evaluation): a module's own ``evaluate``, the
averaged validation loss, and which dataloader a running Trainer evaluates on."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.evaluation import evaluate_module, evaluation_dataloader
from tests.helpers import make_trainer


def _loader(value: float, n: int = 4) -> DataLoader:
    """``n`` one-feature rows ``value, value + 1, ...`` in batches of 2."""
    return DataLoader(TensorDataset(value + torch.arange(n, dtype=torch.float32)[:, None]), 2)


class MeanModule(L.LightningModule):
    """validation_step returns the batch mean as the loss (wrapped as ``wrap`` says), and
    records the mode and grad state it ran in."""

    def __init__(self, wrap: str = "tensor") -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.wrap = wrap
        self.seen: list[tuple[bool, bool]] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).mean()

    def validation_step(self, batch, batch_idx):
        self.seen.append((self.training, torch.is_grad_enabled()))
        loss = batch[0].mean()
        if self.wrap == "dict":
            return {"loss": loss, "other": 1}
        if self.wrap == "float":
            return float(loss)
        if self.wrap == "dict without loss":
            return {"val_loss": loss}
        if self.wrap == "none":
            return None
        return loss

    def test_step(self, batch, batch_idx):
        return batch[0].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class EvaluatingModule(MeanModule):
    def __init__(self) -> None:
        super().__init__()
        self.evaluated_on = None

    def evaluate(self, dataloader):
        self.evaluated_on = dataloader
        return {"ppl": torch.tensor(12.5), "tokens": 3}


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return _loader(0.0)

    def val_dataloader(self):
        return _loader(100.0)


def test_evaluate_module_uses_the_modules_own_evaluate():
    module, loader = EvaluatingModule(), _loader(0.0)
    metrics = evaluate_module(module, loader)
    assert metrics == {"ppl": 12.5, "tokens": 3.0}
    assert all(type(value) is float for value in metrics.values())
    assert module.evaluated_on is loader and module.seen == []  # validation_step not used


@pytest.mark.parametrize("wrap", ["tensor", "dict"])
def test_evaluate_module_averages_the_validation_loss(wrap):
    # batches [0, 1], [2, 3], [4, 5]: means 0.5, 2.5, 4.5
    metrics = evaluate_module(MeanModule(wrap), _loader(0.0, n=6))
    assert metrics == {"loss": pytest.approx(2.5)}
    assert type(metrics["loss"]) is float


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_module_runs_in_eval_mode_without_grad_and_restores_the_mode(training):
    module = MeanModule()
    module.train(training)
    evaluate_module(module, _loader(0.0))
    assert module.seen == [(False, False), (False, False)]
    assert module.training is training and module.layer.training is training


@pytest.mark.parametrize(
    ("wrap", "returned"), [("float", "float"), ("dict without loss", "dict"), ("none", "NoneType")]
)
def test_evaluate_module_rejects_a_validation_step_that_returns_no_loss_tensor(wrap, returned):
    module = MeanModule(wrap)
    module.train()
    with pytest.raises(PPQConfigError, match=f"MeanModule.validation_step returned {returned};"):
        evaluate_module(module, _loader(0.0))
    assert module.training  # restored after the error too


class Capture(L.Callback):
    """Calls ``evaluation_dataloader(trainer)`` when the run's loop starts."""

    def __init__(self) -> None:
        self.loader, self.error = None, None

    def _capture(self, trainer) -> None:
        try:
            self.loader = evaluation_dataloader(trainer)
        except PPQConfigError as error:
            self.error = error

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._capture(trainer)

    def on_test_start(self, trainer, pl_module):
        self._capture(trainer)

    def on_train_start(self, trainer, pl_module):
        self._capture(trainer)


def _firsts(loader) -> list[float]:
    return [float(batch[0][0, 0]) for batch in loader]


def test_evaluation_dataloader_in_validate_is_the_validation_dataloader(tmp_path):
    capture, loader = Capture(), _loader(50.0)
    make_trainer(tmp_path, [capture]).validate(MeanModule(), loader, verbose=False)
    assert capture.loader is loader


def test_evaluation_dataloader_in_test_is_the_test_dataloader(tmp_path):
    capture, loader = Capture(), _loader(70.0)
    make_trainer(tmp_path, [capture]).test(MeanModule(), loader, verbose=False)
    assert capture.loader is loader


def test_evaluation_dataloader_in_fit_falls_back_to_the_datamodules_validation_data(tmp_path):
    capture = Capture()
    trainer = make_trainer(tmp_path, [capture], max_steps=1, limit_val_batches=0)
    trainer.fit(MeanModule(), datamodule=Data())
    assert capture.error is None
    assert _firsts(capture.loader) == [100.0, 102.0]


def test_evaluation_dataloader_without_evaluation_data_raises(tmp_path):
    capture = Capture()
    trainer = make_trainer(tmp_path, [capture], max_steps=1, limit_val_batches=0)
    trainer.fit(MeanModule(), train_dataloaders=_loader(0.0))
    assert capture.loader is None
    assert "evaluate_each_stage=True needs data to evaluate on" in str(capture.error)


def test_evaluation_dataloader_of_an_idle_trainer_raises(tmp_path):
    with pytest.raises(PPQConfigError, match="evaluate_each_stage=True needs data"):
        evaluation_dataloader(make_trainer(tmp_path))


def test_an_empty_evaluation_dataloader_is_an_error_not_a_perfect_loss():
    with pytest.raises(PPQConfigError, match="yielded no batch"):
        evaluate_module(MeanModule(), [])
