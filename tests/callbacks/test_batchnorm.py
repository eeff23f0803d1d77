import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.calibration.batchnorm import batchnorm_layers, recalibrate_batchnorm
from ppq_lightning.callbacks import (
    GPTQ,
    BatchNormRecalibration,
    CompressionSchedule,
    FoldBatchNorm,
    MagnitudePruning,
    RTNQuantization,
)
from ppq_lightning.compressed.state import applied_stages, current_mask, get_state
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import make_trainer

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}


def _module() -> ImageClassifierModule:
    module = ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET)
    generator = torch.Generator().manual_seed(1)
    for bn in batchnorm_layers(module).values():  # statistics a recalibration must move
        bn.running_mean.normal_(0, 0.2, generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
        bn.weight.data.uniform_(0.5, 1.5, generator=generator)
    return module


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,)))
        for _ in range(n)
    ]


def _loader(batches) -> DataLoader:
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(images, labels), batch_size=len(batches[0][1]))


def _logits(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(images)


# -- BatchNormRecalibration ------------------------------------------------------------------


def test_recalibration_stage_re_estimates_every_batchnorm():
    module, batches = _module(), _batches(5)
    reference = copy.deepcopy(module)
    recalibrate_batchnorm(reference, [b[0] for b in batches[:2]])
    stage = BatchNormRecalibration(num_calibration_batches=2)
    result = stage.apply(module, dataloader=batches)
    bns = batchnorm_layers(module)
    assert len(bns) == 21 and set(result.layers) == set(bns)
    assert all(set(v) == {"mean_shift", "var_ratio"} for v in result.layers.values())
    assert result.kind == "N" and result.name == "bn"
    for name, bn in bns.items():
        expected = batchnorm_layers(reference)[name]
        assert torch.equal(bn.running_mean, expected.running_mean), name
        assert torch.equal(bn.running_var, expected.running_var), name
        history = get_state(bn).history
        assert [(h["method"], h["kind"]) for h in history] == [("BatchNormRecalibration", "N")]
        assert history[0]["num_calibration_batches"] == 2
    assert stage.state_key in applied_stages(module)
    assert check_invariants(module) == 21


def test_recalibration_stage_of_chosen_layers():
    module = _module()
    before = {n: bn.running_var.clone() for n, bn in batchnorm_layers(module).items()}
    result = BatchNormRecalibration(layers=r"layer4\.").apply(module, dataloader=_batches())
    assert set(result.layers) == {n for n in before if n.startswith("model.layer4.")}
    assert len(result.layers) == 5
    for name, bn in batchnorm_layers(module).items():
        assert torch.equal(bn.running_var, before[name]) is (name not in result.layers), name
        assert (get_state(bn) is None) is (name not in result.layers), name


def test_recalibration_stage_errors():
    with pytest.raises(PPQConfigError, match=r"num_calibration_batches=0 is not allowed"):
        BatchNormRecalibration(num_calibration_batches=0)
    with pytest.raises(PPQConfigError, match=r"layers=3 is not allowed"):
        BatchNormRecalibration(layers=3)
    with pytest.raises(PPQConfigError, match=r"layers='\[' is not allowed"):
        BatchNormRecalibration(layers="[")
    module = _module()
    with pytest.raises(PPQConfigError, match=r"layers='nothing' matched none of the BatchNorm"):
        BatchNormRecalibration(layers="nothing").apply(module, dataloader=_batches())
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.zeros(1, 3, 8, 8))  # the middle conv: a default target (not the stem or head)
    with pytest.raises(PPQConfigError, match=r"found no BatchNorm layer"):
        BatchNormRecalibration().apply(plain, dataloader=[torch.zeros(1, 3, 8, 8)])
    with pytest.raises(PPQConfigError, match=r"needs calibration data"):
        BatchNormRecalibration().apply(module)


def test_recalibration_after_pruning_keeps_the_masks(tmp_path):
    module, batches = _module(), _batches()
    pruning = MagnitudePruning(sparsity=0.5)
    schedule = CompressionSchedule([pruning, BatchNormRecalibration(name="B"), RTNQuantization(4)])
    trainer = make_trainer(tmp_path, [schedule])
    trainer.validate(module, dataloaders=_loader(batches), verbose=False)
    assert schedule.order == "magnitude>B>rtn"
    assert [r.kind for r in schedule.results] == ["P", "N", "Q"]
    assert check_invariants(module) == 20 + 21
    for name, layer in resolve_targets(module).items():
        assert [h["kind"] for h in get_state(layer).history] == ["P", "Q"], name
        assert (layer.weight[~get_state(layer).mask] == 0).all(), name


def test_recalibration_in_validate_is_skipped_when_already_applied(tmp_path):
    module, batches = _module(), _batches()
    make_trainer(tmp_path, [BatchNormRecalibration(num_calibration_batches=1)]).validate(
        module, dataloaders=_loader(batches), verbose=False
    )
    statistics = {n: bn.running_mean.clone() for n, bn in batchnorm_layers(module).items()}
    again = BatchNormRecalibration(num_calibration_batches=1)
    other_data = _loader(_batches(4)[1:])
    make_trainer(tmp_path, [again]).validate(module, dataloaders=other_data, verbose=False)
    assert again._applied and again.result is None  # recognised, not run
    for name, bn in batchnorm_layers(module).items():
        assert torch.equal(bn.running_mean, statistics[name]), name
        assert len(get_state(bn).history) == 1, name


# -- FoldBatchNorm ---------------------------------------------------------------------------


def test_fold_stage_folds_every_conv_batchnorm_pair_and_keeps_the_output():
    module, batches = _module(), _batches()
    images = batches[0][0]
    before = _logits(module, images)
    stage = FoldBatchNorm(name="F")
    result = stage.apply(module, dataloader=batches)
    assert result.kind == "N" and len(result.layers) == 21
    assert all(v == {"folded": 1.0} for v in result.layers.values())
    assert {"model.conv1", "model.layer1.0.downsample.0"} <= set(result.layers)  # stem included
    assert batchnorm_layers(module) == {}
    assert torch.allclose(_logits(module, images), before, atol=1e-4)
    for conv in result.layers:
        (entry,) = get_state(module.get_submodule(conv)).history
        assert (entry["method"], entry["kind"], entry["edit"]) == (
            "FoldBatchNorm",
            "N",
            "fold_batchnorm",
        )
    assert get_state(module.model.conv1).history[0]["batchnorm"] == "model.bn1"
    assert stage.state_key in applied_stages(module)


def test_fold_stage_of_chosen_convolutions():
    module = _module()
    result = FoldBatchNorm(targets=r"layer1\.").apply(module, dataloader=_batches())
    assert set(result.layers) == {
        f"model.layer1.{b}.{c}" for b in (0, 1) for c in ("conv1", "conv2")
    } | {"model.layer1.0.downsample.0"}
    assert isinstance(module.model.bn1, nn.BatchNorm2d)
    assert len(batchnorm_layers(module)) == 21 - 5


def test_fold_stage_keeps_pruned_zeros():
    module, batches = _module(), _batches()
    MagnitudePruning(sparsity=0.6).apply(module)
    masks = {n: current_mask(m).clone() for n, m in resolve_targets(module).items()}
    FoldBatchNorm().apply(module, dataloader=batches)
    assert check_invariants(module) == 21
    for name, layer in resolve_targets(module).items():
        assert torch.equal(current_mask(layer), masks[name]), name
        assert [h["kind"] for h in get_state(layer).history] == ["P", "N"], name


def test_fold_stage_refuses_quantized_convolutions_before_changing_anything():
    module, batches = _module(), _batches()
    RTNQuantization(bits=4).apply(module)  # every default target: the stem conv1 is not one
    state = copy.deepcopy(module.state_dict())
    with pytest.raises(PPQConfigError, match=r"model.layer1.0.conv1 is quantized"):
        FoldBatchNorm().apply(module, dataloader=batches)
    assert isinstance(module.model.bn1, nn.BatchNorm2d) and module.model.conv1.bias is None
    after = module.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items() if torch.is_tensor(v))


def test_fold_stage_needs_a_conv_followed_by_batchnorm():
    model = nn.Sequential(  # conv, ReLU, BatchNorm; the middle conv is a default target
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
    )
    with pytest.raises(PPQConfigError, match=r"found no convolution followed directly by Batch"):
        FoldBatchNorm().apply(model, dataloader=[torch.zeros(1, 3, 8, 8)])
    with pytest.raises(PPQConfigError, match=r"targets='fc'"):
        FoldBatchNorm(targets="fc").apply(_module(), dataloader=_batches())


def test_fold_then_gptq_in_a_schedule_keeps_the_invariants(tmp_path):
    module, batches = _module(), _batches()
    schedule = CompressionSchedule(
        [GPTQ(bits=4, num_calibration_batches=2, name="Q"), FoldBatchNorm(name="F")], order="F>Q"
    )
    trainer = make_trainer(tmp_path, [schedule])
    (metrics,) = trainer.validate(module, dataloaders=_loader(batches), verbose=False)
    assert 0 <= metrics["val/acc"] <= 1
    assert [(r.name, r.kind) for r in schedule.results] == [("F", "N"), ("Q", "Q")]
    assert check_invariants(module) == 21
    targets = resolve_targets(module)
    for name, layer in targets.items():
        assert [h["kind"] for h in get_state(layer).history] == ["N", "Q"], name
        assert get_state(layer).grid.bits == 4, name
    assert [h["kind"] for h in get_state(module.model.conv1).history] == ["N"]
    # the folded and quantized model reloads into a fresh one
    images = batches[0][0]
    expected = _logits(module, images)
    fresh = ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET)
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(_logits(fresh, images), expected)
    assert check_invariants(fresh) == 21


def test_fold_then_gptq_through_apply():
    module, batches = _module(), _batches()
    FoldBatchNorm().apply(module, dataloader=batches)
    GPTQ(bits=3, num_calibration_batches=2).apply(module, index=2, dataloader=batches)
    assert check_invariants(module) == 21
    assert all(get_state(m).grid.bits == 3 for m in resolve_targets(module).values())


def test_fold_in_validate_is_skipped_when_already_applied(tmp_path):
    module, batches = _module(), _batches()
    FoldBatchNorm().apply(module, dataloader=batches)
    again = FoldBatchNorm()
    make_trainer(tmp_path, [again]).validate(module, dataloaders=_loader(batches), verbose=False)
    assert again._applied and again.result is None  # no BatchNorm is left: it would have raised
    assert len(get_state(module.model.conv1).history) == 1
