"""Calibration data (ppq_lightning.calibration.data): what a batch feeds the model, and where a
callback's calibration batches come from inside a real Trainer."""

import itertools
import re

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning.calibration.data import (
    batch_input,
    calibration_batches,
    calibration_data,
    check_num_batches,
    default_forward,
    describe_batch,
    forward_call,
)
from ppq_lightning.errors import PPQConfigError
from tests.helpers import make_trainer


def _loader(value: float, n: int = 6) -> DataLoader:
    """``n`` rows of 4 features, all equal to ``value + row``, in batches of 2."""
    rows = value + torch.arange(n, dtype=torch.float32)[:, None].expand(n, 4)
    return DataLoader(TensorDataset(rows.contiguous()), batch_size=2)


def _firsts(batches) -> list[float]:
    """The first entry of each batch (a ``[tensor]`` list from a TensorDataset)."""
    return [float(batch[0][0, 0]) for batch in batches]


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def test_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Data(L.LightningDataModule):
    """Train rows start at 0, validation rows at 100, test rows at 200."""

    def train_dataloader(self):
        return _loader(0.0)

    def val_dataloader(self):
        return _loader(100.0)

    def test_dataloader(self):
        return _loader(200.0)


class CalibrationData(Data):
    """Calibration rows start at 300."""

    def calibration_dataloader(self):
        return _loader(300.0)


class EmptyCalibrationData(Data):
    def calibration_dataloader(self):
        return DataLoader(TensorDataset(torch.empty(0, 4)), batch_size=2)


class Collect(L.Callback):
    """Calls ``calibration_batches(trainer, n)`` at the start of the run's loop."""

    def __init__(self, n: int) -> None:
        self.n, self.batches = n, None

    def _collect(self, trainer) -> None:
        self.batches = calibration_batches(trainer, self.n)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._collect(trainer)

    def on_train_start(self, trainer, pl_module):
        self._collect(trainer)

    def on_test_start(self, trainer, pl_module):
        self._collect(trainer)


def test_batch_input_returns_a_tensor_batch_itself():
    batch = torch.zeros(2, 3)
    assert batch_input(batch) is batch


def test_batch_input_takes_input_ids_from_a_dict():
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert batch_input({"input_ids": ids, "labels": torch.ones(2, 3)}) is ids


@pytest.mark.parametrize("container", [list, tuple])
def test_batch_input_takes_the_first_element_of_a_list_or_tuple(container):
    first = torch.zeros(2, 3)
    assert batch_input(container([first, torch.ones(2)])) is first


def test_batch_input_rejects_a_dict_without_input_ids_naming_its_keys():
    message = "a batch is a dict with keys ['attention_mask', 'labels']; expected 'input_ids'"
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        batch_input({"labels": torch.ones(1), "attention_mask": torch.ones(1)})


@pytest.mark.parametrize(("batch", "type_name"), [(3, "int"), ("text", "str"), ([], "list")])
def test_batch_input_rejects_unsupported_batches(batch, type_name):
    with pytest.raises(PPQConfigError, match=f"cannot feed a batch of type {type_name} to"):
        batch_input(batch)


def test_default_forward_calls_the_model_on_the_batch_input():
    model = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    assert torch.equal(default_forward(model, {"input_ids": x}), model(x))
    assert torch.equal(default_forward(model, (x, torch.zeros(3))), model(x))


def test_default_forward_moves_the_input_to_the_device_of_the_parameters():
    model = nn.Linear(4, 2, device="meta")  # a device other than the batch's CPU
    out = default_forward(model, torch.randn(3, 4))
    assert out.device.type == "meta" and out.shape == (3, 2)


@pytest.mark.parametrize("value", [1, 7])
def test_check_num_batches_returns_accepted_values(value):
    assert check_num_batches(value) == value


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2", None])
def test_check_num_batches_rejects_other_values(value):
    message = f"num_calibration_batches={value!r} is not allowed: expected an integer >= 1."
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        check_num_batches(value)


def test_calibration_batches_checks_the_number_before_using_a_dataloader():
    with pytest.raises(PPQConfigError, match="num_calibration_batches=0"):
        calibration_batches(None, 0, dataloader=[torch.zeros(1)])


def test_calibration_batches_truncates_an_explicit_dataloader():
    batches = [torch.full((1,), float(i)) for i in range(5)]
    taken = calibration_batches(None, 3, dataloader=batches)
    assert len(taken) == 3 and all(a is b for a, b in zip(taken, batches, strict=False))
    assert calibration_batches(None, 9, dataloader=batches) == batches  # fewer than asked: all


def test_calibration_batches_reads_no_more_of_an_explicit_iterator_than_asked():
    assert calibration_batches(None, 3, dataloader=itertools.count()) == [0, 1, 2]


def test_calibration_batches_without_trainer_or_dataloader_raises():
    with pytest.raises(PPQConfigError, match="this method needs calibration data"):
        calibration_batches(None, 2)


def test_calibration_batches_outside_a_running_trainer_raises(tmp_path):
    with pytest.raises(PPQConfigError, match="no calibration data"):
        calibration_batches(make_trainer(tmp_path), 2)


def test_calibration_batches_prefer_the_datamodules_calibration_dataloader(tmp_path):
    collect = Collect(2)
    make_trainer(tmp_path, [collect]).validate(TinyModule(), datamodule=CalibrationData())
    assert _firsts(collect.batches) == [300.0, 302.0]


def test_calibration_batches_in_validate_use_the_validation_dataloader(tmp_path):
    collect = Collect(2)
    make_trainer(tmp_path, [collect]).validate(TinyModule(), datamodule=Data())
    assert _firsts(collect.batches) == [100.0, 102.0]


def test_calibration_batches_in_validate_with_plain_dataloaders(tmp_path):
    collect = Collect(5)  # more than the 3 batches there are: all of them
    make_trainer(tmp_path, [collect]).validate(TinyModule(), _loader(50.0))
    assert _firsts(collect.batches) == [50.0, 52.0, 54.0]


def test_calibration_batches_in_fit_use_the_train_dataloader(tmp_path):
    collect = Collect(2)
    trainer = make_trainer(tmp_path, [collect], max_steps=1, limit_val_batches=0)
    trainer.fit(TinyModule(), datamodule=Data())
    assert _firsts(collect.batches) == [0.0, 2.0]
    plain = Collect(1)
    trainer = make_trainer(tmp_path, [plain], max_steps=1, limit_val_batches=0)
    trainer.fit(TinyModule(), train_dataloaders=_loader(10.0))
    assert _firsts(plain.batches) == [10.0]


def test_calibration_batches_in_test_use_the_test_dataloader(tmp_path):
    collect = Collect(1)
    make_trainer(tmp_path, [collect]).test(TinyModule(), datamodule=Data(), verbose=False)
    assert _firsts(collect.batches) == [200.0]


def test_calibration_batches_ignore_a_calibration_dataloader_that_is_not_callable(tmp_path):
    data = Data()
    data.calibration_dataloader = None
    collect = Collect(1)
    make_trainer(tmp_path, [collect]).validate(TinyModule(), datamodule=data)
    assert _firsts(collect.batches) == [100.0]


def test_calibration_batches_from_an_empty_calibration_dataloader_raise_naming_it(tmp_path):
    message = "the calibration dataloader is empty: datamodule.calibration_dataloader() yielded no"
    trainer = make_trainer(tmp_path, [Collect(2)])
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        trainer.validate(TinyModule(), datamodule=EmptyCalibrationData())


# -- the default forward reads the model's signature (#26, point 9) ---------------------------
class Pair(nn.Module):
    """``forward(inputs, target)``, as Lightning's demo Transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.layer(inputs) + target


class Keywords(nn.Module):
    """``forward(**batch)``, as an HF model wrapped in a user's LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.layer(batch["x"]) * batch["scale"]


class Masked(nn.Module):
    """``forward(input_ids, attention_mask=None)``: keys it does not take are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.layer(input_ids) * (1 if attention_mask is None else attention_mask)


def test_forward_call_gives_a_tuple_batch_as_the_forwards_required_inputs():
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    assert forward_call(Pair(), (x, y)) == ((x, y), {})
    assert forward_call(Pair(), [x, y, torch.zeros(3)]) == ((x, y), {})  # extra items: labels
    assert forward_call(nn.Linear(4, 2), (x, y)) == ((x,), {})  # forward(input): y is a label
    pair = Pair()
    assert torch.equal(default_forward(pair, (x, y)), pair(x, y))


def test_forward_call_gives_a_dict_by_name_or_whole_to_a_forward_taking_keywords():
    x, scale, labels = torch.randn(3, 4), torch.full((3, 1), 2.0), torch.ones(3)
    assert forward_call(Keywords(), {"x": x, "scale": scale}) == ((), {"x": x, "scale": scale})
    mask = torch.ones(3, 1)
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
    assert forward_call(Masked(), batch) == ((), {"input_ids": x, "attention_mask": mask})
    keywords = Keywords()
    assert torch.equal(
        default_forward(keywords, {"x": x, "scale": scale}), keywords(x=x, scale=scale)
    )


def test_forward_call_reads_input_ids_for_a_forward_whose_parameter_has_another_name():
    x = torch.randn(3, 4)
    assert forward_call(nn.Linear(4, 2), {"input_ids": x, "labels": x}) == ((x,), {})


@pytest.mark.parametrize(
    ("model", "batch", "reason", "example"),
    [
        (Pair(), torch.zeros(3, 4), "the batch is one tensor", "model(batch)"),
        (
            Pair(),
            (torch.zeros(3, 4),),
            "the forward needs 2 inputs (inputs, target), the batch has 1 item(s)",
            "model(batch[0], batch[1])",
        ),
        (
            nn.Linear(4, 2),
            {"image": torch.zeros(3, 4), "label": torch.ones(3)},
            "the batch is a dict with keys ['image', 'label'], none of which the forward takes",
            "model(batch['image'])",
        ),
        (
            Keywords(),
            (torch.zeros(3, 4),),
            "the batch is a tuple, and the forward takes no positional input",
            "model(batch[0])",
        ),
    ],
)
def test_a_batch_the_default_forward_cannot_read_names_module_signature_batch_and_fix(
    model, batch, reason, example
):
    with pytest.raises(PPQConfigError) as error:
        forward_call(model, batch)
    message = str(error.value)
    name = type(model).__name__
    assert message.startswith(f"cannot call {name} on a batch: {reason}")
    assert f"Its forward is {name}.forward(" in message
    assert f"the batch is {describe_batch(batch)}" in message
    assert f"forward_fn=lambda model, batch: {example}" in message


def test_describe_batch_gives_the_structure_with_shapes_and_dtypes():
    batch = {"image": torch.zeros(4, 3, 8, 8), "label": torch.zeros(4, dtype=torch.long)}
    assert (
        describe_batch(batch) == "dict(image: Tensor[4, 3, 8, 8] float32, label: Tensor[4] int64)"
    )
    assert describe_batch((torch.zeros(2), [1, 2])) == "tuple(Tensor[2] float32, list(int, int))"


def test_a_type_error_inside_the_forward_gets_a_note_on_how_it_was_called():
    class Strict(nn.Module):
        def forward(self, x):
            raise TypeError("unsupported operand")

    with pytest.raises(TypeError) as error:
        default_forward(Strict(), (torch.zeros(2), torch.ones(2)))
    assert "the default forward called Strict(Tensor[2] float32)" in "".join(error.value.__notes__)


# -- where calibration batches come from, said and recorded (#26, point 9) --------------------
def test_calibration_data_says_the_loader_was_short_and_where_it_came_from():
    data = calibration_data(None, 8, dataloader=[torch.zeros(1)] * 3)
    assert (data.origin, data.requested, data.taken, data.short) == (
        "the dataloader given to apply()",
        8,
        3,
        True,
    )
    assert not data.evaluation and len(data.batches) == 3
    assert not calibration_data(None, 2, dataloader=[torch.zeros(1)] * 3).short


class CollectData(Collect):
    def _collect(self, trainer) -> None:
        self.batches = calibration_data(trainer, self.n)


@pytest.mark.parametrize(
    ("call", "evaluation"), [("validate", True), ("test", True), ("fit", False)]
)
def test_calibration_data_says_when_it_is_the_data_the_run_evaluates_on(tmp_path, call, evaluation):
    for data, evaluated in ((Data(), evaluation), (CalibrationData(), False)):
        collect = CollectData(2)
        trainer = make_trainer(tmp_path, [collect], max_steps=1, num_sanity_val_steps=0)
        arguments = {} if call == "fit" else {"verbose": False}
        getattr(trainer, call)(TinyModule(), datamodule=data, **arguments)
        assert collect.batches.evaluation is evaluated
    assert collect.batches.origin == "datamodule.calibration_dataloader()"
