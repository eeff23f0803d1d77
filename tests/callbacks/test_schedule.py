import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    CompressionSchedule,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
)
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import TINY_LLAMA, make_trainer


def _stages(order):
    make = {
        "P": lambda: MagnitudePruning(sparsity=0.5, name="P"),
        "Q": lambda: RTNQuantization(bits=4, group_size=32, name="Q"),
    }
    return [make[s]() for s in order]


@pytest.mark.parametrize("order", ["PQ", "QP"])
def test_invariants_and_report_after_either_order(tmp_path, tiny_lm, tiny_data, order):
    schedule = CompressionSchedule(stages=_stages(order))
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, [schedule], logger=logger)
    final = trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False)[0]
    assert check_invariants(tiny_lm) == 14
    for module in resolve_targets(tiny_lm).values():
        state = get_state(module)
        assert state.stages == [s.state_key for s in schedule.stages]
        sparsity = 1 - state.mask.float().mean().item()
        assert sparsity == pytest.approx(0.5, abs=1e-6)  # the mask is exact in both orders
        assert state.bits == 4
    # evaluation after every stage; the last equals the trainer's own validation
    rows = schedule.rows()
    assert [r["stage"] for r in rows] == ["0_dense", f"1_{order[0]}", f"2_{order[1]}"]
    assert rows[-1]["ppl"] == pytest.approx(final["val/ppl"], rel=1e-5)
    assert rows[0]["measured_C"] == 1.0 and rows[-1]["measured_C"] > 3
    assert rows[-1]["nominal_C"] == pytest.approx(8.0)
    report = json.loads((tmp_path / "run" / "version_0" / "schedule.json").read_text())
    assert report["order"] == f"{order[0]}>{order[1]}" and len(report["stages"]) == 3
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = set(next(csv.reader(f)))
    assert {
        f"stage/1_{order[0]}/ppl",
        f"stage/2_{order[1]}/measured_C",
        "stage/0_dense/ppl",
        "val/ppl",
    } <= logged
    assert (
        f"layer/1_{order[0]}/model.model.layers.0.mlp.up_proj/"
        + ("sparsity" if order[0] == "P" else "bits")
        in logged
    )


def test_order_changes_the_result(tiny_data):
    from ppq_lightning.models import CausalLMModule
    from tests.helpers import TINY_LLAMA

    weights = {}
    for order in ("PQ", "QP"):
        module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
        for stage in _stages(order):
            stage.apply(module)
        weights[order] = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    assert not torch.equal(weights["PQ"], weights["QP"])


def test_callback_list_order_is_compression_order(tmp_path, tiny_lm, tiny_data):
    stages = _stages("QP")
    make_trainer(tmp_path, stages).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    state = get_state(tiny_lm.model.model.layers[1].self_attn.o_proj)
    assert [h["kind"] for h in state.history] == ["Q", "P"]
    assert [s.result.index for s in stages] == [1, 2]


def test_without_evaluation(tmp_path, tiny_lm, tiny_data):
    schedule = CompressionSchedule(
        stages=_stages("PQ"), evaluate_each_stage=False, output_dir=str(tmp_path / "report")
    )
    make_trainer(tmp_path, [schedule]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    assert [r["stage"] for r in schedule.rows()] == ["1_P", "2_Q"]
    assert "ppl" not in schedule.rows()[0]
    assert (tmp_path / "report" / "schedule.csv").exists()


class UserModule(L.LightningModule):
    """A user's own module: plain dataloaders, validation_step logs and returns the loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        return loss


def test_works_on_a_users_module_with_plain_dataloaders(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    schedule = CompressionSchedule(stages=[MagnitudePruning(sparsity=0.5), RTNQuantization(bits=2)])
    module = UserModule()
    make_trainer(tmp_path, [schedule]).validate(module, loader, verbose=False)
    losses = [r["val_loss"] for r in schedule.rows()]  # what it logs, not what it returns
    assert len(losses) == 3 and len(set(losses)) == 3
    assert check_invariants(module) == 2


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "stages=\\[\\]"),
        ([nn.Linear(2, 2)], "expected compression callbacks"),
        ([MagnitudePruning(sparsity=0.5), MagnitudePruning(sparsity=0.5)], "distinct `name`"),
        (
            [MagnitudePruning(0.5, name="P"), RTNQuantization(4, name="P")],
            r"name two stages 'P' \(MagnitudePruning\{.*\}@P and "
            r"RTNQuantization\{.*distinct `name`",
        ),
        (  # two unnamed stages of one method share its default name
            [MagnitudePruning(sparsity=0.3), MagnitudePruning(sparsity=0.5)],
            r"name two stages 'magnitude' .*'sparsity': 0.3.*'sparsity': 0.5",
        ),
    ],
)
def test_bad_stages(stages, match):
    with pytest.raises(PPQConfigError, match=match):
        CompressionSchedule(stages=stages)


@pytest.mark.parametrize("argument", ["evaluate_each_stage", "log_layers"])
def test_booleans_are_booleans(argument):
    with pytest.raises(PPQConfigError, match=f"{argument}='false' is not allowed"):
        CompressionSchedule(stages=_stages("PQ"), **{argument: "false"})


def test_duplicate_callbacks_in_trainer_need_names(tmp_path):
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        make_trainer(tmp_path, [RTNQuantization(bits=4), RTNQuantization(bits=4)])
    make_trainer(tmp_path, [RTNQuantization(bits=4, name="a"), RTNQuantization(bits=4, name="b")])


def test_order_string_rearranges_and_selects_stages(tmp_path, tiny_lm, tiny_data):
    stages = _stages("PQ")
    schedule = CompressionSchedule(stages=stages, order="Q>P", evaluate_each_stage=False)
    assert schedule.order == "Q>P" and schedule.stages == stages[::-1]
    make_trainer(tmp_path, [schedule]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    layer = next(iter(resolve_targets(tiny_lm).values()))
    assert get_state(layer).stages == [stages[1].state_key, stages[0].state_key]
    only_q = CompressionSchedule(stages=_stages("PQ"), order="Q")
    assert only_q.order == "Q" and len(only_q.stages) == 1
    with pytest.raises(PPQConfigError, match="names 'X', which is not a configured stage"):
        CompressionSchedule(stages=_stages("PQ"), order="P>X")


@pytest.mark.parametrize(
    ("later", "match"),
    [
        (RTNQuantization(bits=4, group_size=48, name="Q"), r"group_size \(.*\)=48"),
        (MagnitudePruning(pattern="2:3", name="P2"), "2:3"),
        (RTNQuantization(bits=4, targets="nothing_matches", name="Q"), "targets"),
    ],
)
def test_a_schedule_checks_its_later_stages_before_the_first_changes_a_weight(
    tmp_path, tiny_lm, tiny_data, later, match
):
    from tests.bad_inputs.helpers import assert_refused

    schedule = CompressionSchedule(stages=[MagnitudePruning(sparsity=0.5, name="P"), later])
    trainer = make_trainer(tmp_path, [schedule])
    assert_refused(
        lambda: trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False),
        PPQConfigError,
        match,
        model=tiny_lm,
    )


def test_a_stage_failing_mid_schedule_says_what_was_applied(tmp_path, tiny_lm, tiny_data):
    class Failing(RTNQuantization):
        def compress(self, model, modules):
            raise RuntimeError("boom")

    schedule = CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5, name="P"), Failing(bits=4)]
    )
    with pytest.raises(RuntimeError, match="boom") as info:
        make_trainer(tmp_path, [schedule]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    notes = " ".join(info.value.__notes__)
    assert "stage(s) P had been applied before rtn failed" in notes
    assert "restored" in notes  # the failing stage's own layers are as they were


def test_a_report_dir_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_lm, tiny_data):
    from tests.bad_inputs.helpers import assert_refused

    (tmp_path / "report").write_text("")
    schedule = CompressionSchedule(stages=_stages("PQ"), output_dir=str(tmp_path / "report"))
    trainer = make_trainer(tmp_path, [schedule])
    assert_refused(
        lambda: trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False),
        PPQConfigError,
        "report_dir=.*report.* is a file",
        model=tiny_lm,
    )


def test_a_merge_without_reprojection_after_pruning_is_refused_before_pruning(tmp_path, tiny_lm):
    from ppq_lightning.callbacks import LoRAFineTune
    from tests.bad_inputs.helpers import assert_refused

    windows = torch.arange(32).repeat(3, 1)
    schedule = CompressionSchedule(
        stages=[
            MagnitudePruning(sparsity=0.5, name="P"),
            LoRAFineTune(r=2, merge="at_end", reproject=False),
        ]
    )
    trainer = make_trainer(tmp_path, [schedule], max_steps=2)
    assert_refused(
        lambda: trainer.fit(tiny_lm, train_dataloaders=DataLoader(list(windows), batch_size=1)),
        PPQConfigError,
        "reproject=False is not allowed after stage 'P'",
        model=tiny_lm,
    )


def test_a_resumed_schedule_with_a_changed_stage_is_refused(tmp_path, tiny_data):
    from ppq_lightning.compressed.state import compressed_modules
    from ppq_lightning.models import CausalLMModule
    from tests.helpers import TINY_LLAMA

    trainer = make_trainer(
        tmp_path, [CompressionSchedule(_stages("PQ"), evaluate_each_stage=False)]
    )
    trainer.validate(CausalLMModule(model_config=TINY_LLAMA), datamodule=tiny_data, verbose=False)
    trainer.save_checkpoint(tmp_path / "pq.ckpt")
    changed = [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=3, name="Q")]
    fresh = CausalLMModule(model_config=TINY_LLAMA)
    with pytest.raises(PPQConfigError, match=r"stage 'Q'.*'bits': 4.*'bits': 3.*another `name`"):
        make_trainer(tmp_path, [CompressionSchedule(changed, evaluate_each_stage=False)]).validate(
            fresh, datamodule=tiny_data, ckpt_path=tmp_path / "pq.ckpt", verbose=False
        )
    histories = [[e["name"] for e in state.history] for _, _, state in compressed_modules(fresh)]
    assert histories and all(h == ["P", "Q"] for h in histories)  # not P, Q, Q


class CountingQAT(QuantizationAwareTraining):
    """A training stage with hooks no schedule forwarded by name before (#25)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = dict.fromkeys(
            ["on_before_zero_grad", "on_train_epoch_end", "on_train_end", "on_fit_end", "teardown"],
            0,
        )

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self.calls["on_before_zero_grad"] += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.calls["on_train_epoch_end"] += 1

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self.calls["on_train_end"] += 1

    def on_fit_end(self, trainer, pl_module):
        self.calls["on_fit_end"] += 1

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        self.calls["teardown"] += 1


def test_a_training_stage_in_a_schedule_gets_every_hook_it_implements(tmp_path):
    windows = DataLoader(list((torch.arange(32) % 8 + 10).repeat(3, 1)), batch_size=1)
    counts, states = [], []
    for in_schedule in (True, False):
        model = CausalLMModule(model_config=TINY_LLAMA, seed=0)
        qat = CountingQAT(bits=4)
        stages = [MagnitudePruning(0.5), qat]
        callbacks = (
            [CompressionSchedule(stages, evaluate_each_stage=False)] if in_schedule else stages
        )
        trainer = make_trainer(tmp_path / str(in_schedule), callbacks, max_steps=3)
        trainer.fit(model, train_dataloaders=windows)
        counts.append(dict(qat.calls))
        states.append(callbacks[0].state_dict())
    assert counts[0] == counts[1]
    assert counts[0]["on_before_zero_grad"] == 3 and counts[1]["on_train_epoch_end"] == 1
    assert counts[0]["on_train_end"] == counts[1]["on_fit_end"] == counts[1]["teardown"] == 1
    assert states[0]["stages"][1] == {"applied": True}  # the stage's state in the schedule's
