import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import CompressionSchedule, MagnitudePruning, RTNQuantization
from ppq_lightning.callbacks.qat import QuantizationAwareTraining
from ppq_lightning.compressed.state import current_grid, current_mask, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.transforms import has_weight_transform, transformed_weight
from ppq_lightning.modules.views import as_matrix, weight_matrix
from ppq_lightning.ops.quant_grid import compute_grid
from tests.helpers import TINY_LLAMA, make_trainer

WINDOWS = (torch.arange(32) % 8 + 10).repeat(3, 1)


def memorisable() -> DataLoader:
    return DataLoader(list(WINDOWS), batch_size=1, shuffle=False)


class MaskProbe(L.Callback):
    """After every optimizer step (and the stages' upkeep): pruned latent weights and their
    fake-quantized values are exactly 0, and the forward's weight is on the latent's grid."""

    def __init__(self, bits: int) -> None:
        self.bits, self.checked_steps = bits, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, module in resolve_targets(pl_module).items():
            assert has_weight_transform(module), name
            mask = current_mask(module)
            assert mask is not None and (weight_matrix(module)[~mask] == 0).all(), name
            seen = as_matrix(module, transformed_weight(module)).detach()
            assert (seen[~mask] == 0).all(), name
            grid = compute_grid(weight_matrix(module), self.bits)
            assert torch.equal(seen, grid.fake_quantize(weight_matrix(module))), name
        self.checked_steps += 1


def test_qat_after_pruning_keeps_masks_and_ends_on_the_grid(tmp_path, tiny_lm, tiny_data):
    tiny_lm.learning_rate = 1e-2  # weights move visibly in a few steps
    start = {n: m.weight.detach().clone() for n, m in resolve_targets(tiny_lm).items()}
    pruning, qat, probe = MagnitudePruning(sparsity=0.5), QuantizationAwareTraining(bits=4), None
    probe = MaskProbe(bits=4)
    trainer = make_trainer(tmp_path, [pruning, qat, probe], max_steps=3, limit_val_batches=1)
    trainer.fit(tiny_lm, datamodule=tiny_data)
    assert probe.checked_steps == 3
    modules = resolve_targets(tiny_lm)
    assert check_invariants(tiny_lm) == len(modules) == 14
    for name, module in modules.items():
        assert not has_weight_transform(module) and "forward" not in module.__dict__
        state = get_state(module)
        assert [h["kind"] for h in state.history] == ["P", "Q"]
        assert state.history[-1]["method"] == "QuantizationAwareTraining"
        assert current_grid(module).bits == 4
        assert (module.weight[~state.mask] == 0).all()
        assert not torch.equal(module.weight, start[name])  # trained (and quantized)
    layers = qat.result.layers
    assert set(layers) == set(modules) and qat.result.name == "qat"
    assert all(v["bits"] == 4 and 0 < v["weight_error"] < 0.1 for v in layers.values())
    assert qat.result.index == 2 and qat.result.summary.avg_bits == 4
    assert qat.result.summary.sparsity >= 0.5


def test_qat_replaces_an_earlier_grid(tmp_path):
    model = CausalLMModule(model_config=TINY_LLAMA, seed=0, learning_rate=1e-2)
    stages = [RTNQuantization(bits=8, group_size=32), QuantizationAwareTraining(bits=3)]
    make_trainer(tmp_path, stages, max_steps=2).fit(model, train_dataloaders=memorisable())
    layer = model.model.model.layers[1].mlp.down_proj
    grid = current_grid(layer)
    assert (grid.bits, grid.group_size) == (3, None)
    assert [h["method"] for h in get_state(layer).history] == [
        "RTNQuantization",
        "QuantizationAwareTraining",
    ]
    assert check_invariants(model) == 14
    # the stored weight is the final latent weight on its 3-bit grid: at most 8 levels per row
    assert max(len(torch.unique(row)) for row in weight_matrix(layer)) <= 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, "bits=1 is not allowed: expected an integer from 2 to 8"),
        ({"bits": 16}, "bits=16"),
        ({"bits": 4, "group_size": 0}, "group_size=0"),
        ({"bits": 4, "symmetric": "false"}, "symmetric='false' is not allowed: expected true or"),
        ({"bits": 4, "symmetric": 1}, "symmetric=1 is not allowed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_group_size_not_dividing_a_layer_is_refused_before_any_layer_changes(tmp_path):
    model = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    qat = QuantizationAwareTraining(bits=4, group_size=48)
    with pytest.raises(PPQConfigError, match=r"group_size \(model\.model\.layers\.0\..*=48"):
        make_trainer(tmp_path, [qat], max_steps=1).fit(model, train_dataloaders=memorisable())
    assert not any(has_weight_transform(m) for m in model.modules())


def test_qat_outside_fit_is_an_error(tmp_path, tiny_data):
    model = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    with pytest.raises(
        PPQConfigError, match="QuantizationAwareTraining trains: it belongs in `fit`"
    ):
        make_trainer(tmp_path, [QuantizationAwareTraining(bits=4)]).validate(
            model, datamodule=tiny_data
        )
    assert not any(has_weight_transform(m) for m in model.modules())


def test_qat_in_a_schedule_as_order_q_then_p(tmp_path, tiny_data):
    model = CausalLMModule(model_config=TINY_LLAMA, seed=0, learning_rate=1e-2)
    stages = [MagnitudePruning(sparsity=0.5, name="P"), QuantizationAwareTraining(bits=4, name="Q")]
    schedule = CompressionSchedule(stages, order="Q>P", output_dir=str(tmp_path))
    trainer = make_trainer(tmp_path, [schedule], max_steps=2, limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_data)
    assert [(r.name, r.kind) for r in schedule.results] == [("Q", "Q"), ("P", "P")]
    assert check_invariants(model) == 14  # pruning a QAT-quantized layer keeps it on its grid
    state = get_state(model.model.model.layers[0].mlp.gate_proj)
    assert [h["kind"] for h in state.history] == ["Q", "P"]


def test_not_a_stage_to_apply_at_once_nor_to_time():
    with pytest.raises(PPQConfigError, match="at_step=3 is not allowed"):
        QuantizationAwareTraining(bits=4, at_step=3)
    with pytest.raises(PPQConfigError, match="belongs in `fit`"):
        QuantizationAwareTraining(bits=4).apply(CausalLMModule(model_config=TINY_LLAMA))


def test_a_schedule_starting_with_a_training_stage_reports_the_dense_model(tmp_path, tiny_data):
    model = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    # the fit validates one batch (limit_val_batches=1), and so do the stages' evaluations
    dense = model.evaluate([next(iter(tiny_data.val_dataloader()))])["ppl"]
    schedule = CompressionSchedule(
        [QuantizationAwareTraining(bits=2, name="Q")], evaluate_each_stage=True
    )
    trainer = make_trainer(tmp_path, [schedule], max_steps=1, limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_data)
    rows = schedule.rows()
    # measured before QAT attached its 2-bit fake quantization at setup, not after
    assert rows[0]["stage"] == "0_dense" and rows[0]["ppl"] == pytest.approx(dense, rel=1e-6)
    assert rows[1]["ppl"] != pytest.approx(dense, rel=1e-3)
