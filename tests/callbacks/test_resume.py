import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    CompressionSchedule,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
)
from ppq_lightning.compressed.state import get_state
from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer


def _schedule():
    return CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")]
    )


def test_checkpoint_after_schedule_is_not_reapplied(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    first = _schedule()
    trainer = make_trainer(tmp_path, [first])
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    ckpt = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(ckpt)
    compressed = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}

    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=1)  # other weights: must be replaced
    schedule = _schedule()
    make_trainer(tmp_path, [schedule]).validate(
        fresh, datamodule=tiny_data, ckpt_path=ckpt, verbose=False
    )
    # both stages recognised as applied: the results are the first run's, restored with the
    # schedule's state (its report rows), timings included, not new applications
    assert schedule.results == first.results and len(first.results) == 2
    for key, value in fresh.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, compressed[key]), key
    state = get_state(fresh.model.model.layers[0].mlp.down_proj)
    assert [h["kind"] for h in state.history] == ["P", "Q"]  # each stage once
    assert check_invariants(fresh) == 14


def test_resumed_fit_does_not_reapply(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    pruning = MagnitudePruning(sparsity=0.5)
    trainer = make_trainer(tmp_path, [pruning], max_steps=1, limit_val_batches=1)
    trainer.fit(module, datamodule=tiny_data)
    ckpt = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(ckpt)

    again = MagnitudePruning(sparsity=0.5)
    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    trainer = make_trainer(tmp_path, [again], max_steps=2, limit_val_batches=1)
    trainer.fit(fresh, datamodule=tiny_data, ckpt_path=ckpt)
    assert again.result is None
    state = get_state(fresh.model.model.layers[0].mlp.down_proj)
    assert len(state.history) == 1


class _Boring(BoringModel):
    """Lightning's BoringModel with a hidden layer between its stem and its output layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Sequential(
            nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
        )


def _standalone_stages() -> list:
    return [
        MagnitudePruning(sparsity=0.5),
        LoRAFineTune(r=2, merge="at_end"),
        RTNQuantization(bits=4),
    ]


def test_standalone_stages_resumed_at_the_fits_end_finish_it(tmp_path):
    """P, LoRA and Q as plain callbacks (no schedule), resumed from the checkpoint of the fit's
    last step: Lightning skips the training loop with its on_train_end, where LoRA merges and
    Q fires; the resumed fit ended with "stage(s) 'L', 'Q' never fired" (found for schedules by
    a probe; the same for plain callbacks)."""
    clean = _Boring()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1)
    stages = [*_standalone_stages(), checkpoint]
    make_trainer(tmp_path, stages, max_steps=3, enable_checkpointing=True).fit(clean)
    resumed = _Boring()
    last = tmp_path / "ckpts" / "epoch=0-step=3.ckpt"
    assert last.exists()
    make_trainer(tmp_path / "again", _standalone_stages(), max_steps=3).fit(resumed, ckpt_path=last)
    stages = get_state(resumed.layer[2]).stages
    assert stages == get_state(clean.layer[2]).stages and len(stages) == 3  # P, L, Q
    after = resumed.state_dict()
    assert clean.state_dict().keys() == after.keys()
    for key, value in clean.state_dict().items():
        same = torch.equal(value, after[key]) if torch.is_tensor(value) else value == after[key]
        assert same, key
    assert check_invariants(resumed) == 1
