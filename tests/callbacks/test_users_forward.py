"""Calibrated methods on the forwards users write (#26, point 9): an HF-style
``forward(**batch)``, Lightning's demo ``forward(inputs, target)``; a batch the default forward
cannot read is refused before any weight changes, with the fix; and in ``validate`` the
calibration data's source and a dataloader shorter than ``num_calibration_batches`` are said
and recorded."""

import json
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ppq_lightning.callbacks import (
    GPTQ,
    BlockRemoval,
    CompressionSchedule,
    MagnitudePruning,
    SparseGPT,
    Wanda,
)
from ppq_lightning.callbacks.registry import build_stage
from ppq_lightning.errors import PPQConfigError
from tests.helpers import make_trainer
from tests.user_modules import modules

VOCAB, SEQ = 64, 16


def token_dicts() -> DataLoader:
    """A tokenizer's dicts, with labels: two batches."""
    return modules.token_dicts(n=8)


def token_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The demo Transformer's batches: (inputs, target), target shifted by one."""
    tokens = torch.randint(0, VOCAB, (2, 4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    after = model.state_dict()  # a removed block's weights count as changed
    return [k for k, v in before.items() if k not in after or not torch.equal(v, after[k])]


@pytest.mark.parametrize(
    "stage",
    [
        lambda: GPTQ(bits=4, num_calibration_batches=2),
        lambda: SparseGPT(sparsity=0.5, num_calibration_batches=2),
        lambda: Wanda(sparsity=0.5, num_calibration_batches=2),
        lambda: BlockRemoval(n_blocks=1, num_calibration_batches=2),  # SLEB
    ],
    ids=["gptq", "sparsegpt", "wanda", "sleb"],
)
def test_calibrated_methods_call_an_hf_style_forward_with_the_batch_dict(stage):
    # raised TypeError: UserCausalLM.forward() takes 1 positional argument but 2 were given
    model = modules.UserCausalLM()
    before = _weights(model)
    result = stage().apply(model, dataloader=token_dicts())
    assert result.summary.n_weights > 0 and _changed(before, model)
    assert result.calibration == {
        "calibration_data": "the dataloader given to apply()",
        "calibration_batches": 2,
    }


@pytest.mark.parametrize(
    "stage",
    [
        lambda: GPTQ(bits=4, num_calibration_batches=2, targets=r"linear[12]$"),
        lambda: Wanda(sparsity=0.5, num_calibration_batches=2, targets=r"linear[12]$"),
    ],
    ids=["gptq", "wanda"],
)
def test_calibrated_methods_call_the_demo_transformer_with_inputs_and_target(stage):
    # raised TypeError: LightningTransformer.forward() missing 1 required positional argument
    torch.manual_seed(0)
    model = LightningTransformer(vocab_size=VOCAB)
    before = _weights(model)
    result = stage().apply(model, dataloader=token_pairs())
    changed = _changed(before, model)
    assert result.summary.n_weights > 0 and changed
    assert all(re.search(r"linear[12]\.weight$", k) for k in changed)


class ImageModule(L.LightningModule):
    """``forward(images)``; batches are dicts ``{"image", "label"}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch["image"]), batch["label"]))


class ImageDicts(Dataset):
    def __init__(self, n: int = 12) -> None:
        self.images = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": torch.tensor(i % 4)}


def image_dicts() -> DataLoader:
    return DataLoader(ImageDicts(), batch_size=4)


def test_a_batch_the_forward_cannot_take_is_refused_naming_the_fix_before_any_change():
    model = ImageModule()
    before = _weights(model)
    with pytest.raises(PPQConfigError) as error:
        GPTQ(bits=4, targets="net.1").apply(model, dataloader=image_dicts())
    message = str(error.value)
    assert message.startswith(
        "cannot call ImageModule on a batch: the batch is a dict with keys ['image', 'label'], "
        "none of which the forward takes by name."
    )
    assert "Its forward is ImageModule.forward(images: torch.Tensor) -> torch.Tensor;" in message
    assert "dict(image: Tensor[4, 3, 4, 4] float32, label: Tensor[4] int64)" in message
    assert "forward_fn=lambda model, batch: model(batch['image'])" in message
    assert not _changed(before, model)


def test_a_schedule_checks_every_stages_forward_before_its_first_stage_runs(tmp_path):
    model = ImageModule()
    before = _weights(model)
    stages = [MagnitudePruning(0.5, targets="net.1"), GPTQ(bits=4, targets="net.3")]
    schedule = CompressionSchedule(stages, evaluate_each_stage=False)
    calibration = image_dicts()
    with pytest.raises(
        PPQConfigError, match=r"stage\(s\) 'gptq' \(GPTQ\) run the model .* so no stage"
    ):
        make_trainer(tmp_path, [schedule]).validate(model, calibration, verbose=False)
    assert not _changed(before, model)  # the pruning stage did not run either
    # the fix the error names, as a stage argument
    stages[1] = GPTQ(bits=4, targets="net.3", forward_fn=lambda m, b: m(b["image"]))
    schedule = CompressionSchedule(stages, evaluate_each_stage=False)
    make_trainer(tmp_path, [schedule]).validate(model, calibration, verbose=False)
    assert sorted(_changed(before, model)) == ["net.1.weight", "net.3.weight"]


def test_forward_fn_is_an_argument_of_every_stage():
    def forward(model, batch):
        return model(batch["image"])

    assert build_stage("wanda:0.5", forward_fn=forward).forward_fn is forward
    stage = GPTQ(bits=4, targets="net.1", forward_fn=forward)
    assert stage.identity == GPTQ(bits=4, targets="net.1").identity  # not part of what it computes
    assert stage.apply(ImageModule(), dataloader=image_dicts()).summary.n_weights > 0
    message = "forward_fn=3 is not allowed: expected None or a callable forward_fn(model, batch)."
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        GPTQ(bits=4, forward_fn=3)


def test_validate_says_it_calibrates_on_the_evaluation_data_and_on_fewer_batches(tmp_path):
    # BoringModel's val_dataloader has 64 batches; the stage asks for 100
    stage = GPTQ(bits=4, targets="layer", num_calibration_batches=100, name="Q")
    schedule = CompressionSchedule([stage], evaluate_each_stage=False)
    with pytest.warns(UserWarning) as warned:
        make_trainer(tmp_path, [schedule]).validate(BoringModel(), verbose=False)
    messages = [str(w.message) for w in warned]
    origin = "the validation dataloader of `validate`"
    assert (
        f"[ppq] stage 'Q' (GPTQ): num_calibration_batches=100, but {origin} has only 64 "
        "batch(es): it calibrates on 64." in " ".join(messages)
    )
    assert any(m.startswith(f"[ppq] calibrating on {origin}, the data this run") for m in messages)
    expected = {"calibration_data": origin, "calibration_batches": 64}
    assert stage.result.calibration == expected
    report = json.loads((tmp_path / "schedule.json").read_text())
    assert {k: report["stages"][0][k] for k in expected} == expected
