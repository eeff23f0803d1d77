import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.callbacks import (
    GPTQ,
    CompressionSchedule,
    DeadZoneQuantization,
    LoRAFineTune,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.compressed.state import current_grid, current_mask, get_state
from ppq_lightning.edits.lora import lora_layers
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import input_rows, weight_matrix
from ppq_lightning.ops.gptq import gptq
from ppq_lightning.ops.hessian import accumulate_hessian
from ppq_lightning.ops.sparsegpt import sparsegpt
from ppq_lightning.ops.wanda import accumulate_act_norms, wanda_mask
from tests.helpers import make_trainer

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}
METHODS = {
    "magnitude": lambda **kw: MagnitudePruning(sparsity=0.5, **kw),
    "wanda": lambda **kw: Wanda(sparsity=0.5, num_calibration_batches=2, **kw),
    "sparsegpt": lambda **kw: SparseGPT(sparsity=0.5, num_calibration_batches=2, **kw),
    "rtn": lambda **kw: RTNQuantization(bits=4, **kw),
    "gptq": lambda **kw: GPTQ(bits=4, num_calibration_batches=2, **kw),
}
PRUNES = {"magnitude", "wanda", "sparsegpt"}


def _resnet() -> ImageClassifierModule:
    return ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET)


def _mobilenet() -> ImageClassifierModule:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
    return ImageClassifierModule.from_model(model)


MODELS = {"resnet": _resnet, "mobilenet_v2": _mobilenet}


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,)))
        for _ in range(n)
    ]


def _loader(n: int = 2) -> DataLoader:
    batches = _batches(n)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def _grouped(module: nn.Module) -> list[str]:
    return [
        name
        for name, layer in resolve_targets(module).items()
        if isinstance(layer, nn.Conv2d) and layer.groups > 1
    ]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_compresses_every_default_target(method, family):
    module = MODELS[family]()
    stem, head = (module.get_submodule(name) for name in module.default_ignore)
    kept = {"stem": stem.weight.detach().clone(), "head": head.weight.detach().clone()}
    targets = resolve_targets(module)
    grouped = _grouped(module)
    assert len(grouped) == (17 if family == "mobilenet_v2" else 0)  # depthwise convolutions
    result = METHODS[method]().apply(module, dataloader=_batches())
    assert set(result.layers) == set(targets)
    for name, layer in targets.items():
        if method in PRUNES:
            mask = current_mask(layer)
            assert mask is not None and mask.shape == weight_matrix(layer).shape, name
            assert 0.4 < 1 - mask.float().mean().item() <= 0.5, name  # 4 of 9 in a 3x3 row
        else:
            grid = current_grid(layer)
            assert grid is not None and grid.bits == 4, name
            assert grid.scale.shape == (layer.weight.shape[0], 1), name
    assert get_state(stem) is None and get_state(head) is None
    assert torch.equal(stem.weight, kept["stem"]) and torch.equal(head.weight, kept["head"])
    assert check_invariants(module) == len(targets)


@pytest.mark.parametrize(
    ("family", "make_p", "make_q"),
    [
        ("resnet", METHODS["magnitude"], METHODS["gptq"]),
        ("mobilenet_v2", METHODS["sparsegpt"], METHODS["rtn"]),
    ],
    ids=["magnitude-gptq", "sparsegpt-rtn"],
)
@pytest.mark.parametrize("order", ["P>Q", "Q>P"])
def test_pruning_and_quantization_in_either_order_keep_the_invariants(
    tmp_path, family, make_p, make_q, order
):
    module = MODELS[family]()
    schedule = CompressionSchedule([make_p(name="P"), make_q(name="Q")], order=order)
    (metrics,) = make_trainer(tmp_path, [schedule]).validate(
        module, dataloaders=_loader(), verbose=False
    )
    assert 0 <= metrics["val/acc"] <= 1
    assert [r.name for r in schedule.results] == order.split(">")
    targets = resolve_targets(module)
    assert check_invariants(module) == len(targets)
    for name, layer in targets.items():
        state = get_state(layer)
        assert [h["kind"] for h in state.history] == order.split(">"), name
        assert state.mask is not None and state.grid.bits == 4, name
        assert (layer.weight[~state.mask] == 0).all(), name
    summary = schedule.results[-1].summary
    assert summary.sparsity >= 0.45 and summary.avg_bits == 4


def _grouped_conv() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    generator = torch.Generator().manual_seed(1)
    return model, [torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3)]


def _per_group(conv: nn.Conv2d, batches, accumulate) -> list[torch.Tensor]:
    statistics = []
    for j in range(conv.groups):
        acc, seen = None, 0
        for x in batches:
            acc, seen = accumulate(acc, input_rows(conv, x)[j], seen)
        statistics.append(acc)
    return statistics


def test_layer_statistics_of_a_grouped_conv_are_stacked_per_group():
    model, batches = _grouped_conv()
    conv = model[0]
    statistics = LayerStatistics("hessian")
    for x in batches:
        statistics.observe("0", conv, x)
    (stacked,) = statistics.take(["0"]).values()
    assert stacked.shape == (2, 18, 18)
    for j, hessian in enumerate(_per_group(conv, batches, accumulate_hessian)):
        assert torch.allclose(stacked[j], hessian, atol=1e-6)


def test_gptq_on_a_grouped_conv_equals_gptq_per_group():
    model, batches = _grouped_conv()
    conv = model[0]
    w = weight_matrix(conv).clone()
    hessians = _per_group(conv, batches, accumulate_hessian)
    GPTQ(bits=4, targets="0").apply(model, dataloader=batches)  # its only layer: stem and head
    parts = [gptq(w[3 * j : 3 * j + 3], h, 4) for j, h in enumerate(hessians)]
    expected = torch.cat([p.weight for p in parts])
    assert torch.allclose(weight_matrix(conv), expected, atol=1e-6)
    grid = current_grid(conv)
    assert torch.allclose(grid.scale, torch.cat([p.grid.scale for p in parts]), atol=1e-7)
    assert torch.equal(grid.zero, torch.cat([p.grid.zero for p in parts]))
    assert check_invariants(model) == 1


def test_sparsegpt_and_wanda_on_a_grouped_conv_equal_their_ops_per_group():
    model, batches = _grouped_conv()
    conv = model[0]
    w = weight_matrix(conv).clone()
    hessians = _per_group(conv, batches, accumulate_hessian)
    norms = _per_group(conv, batches, accumulate_act_norms)
    wanda_model = copy.deepcopy(model)
    SparseGPT(sparsity=0.5, targets="0").apply(model, dataloader=batches)
    parts = [sparsegpt(w[3 * j : 3 * j + 3], h, sparsity=0.5) for j, h in enumerate(hessians)]
    assert torch.allclose(weight_matrix(conv), torch.cat([p.weight for p in parts]), atol=1e-6)
    assert torch.equal(current_mask(conv), torch.cat([p.mask for p in parts]))
    Wanda(sparsity=0.5, targets="0").apply(wanda_model, dataloader=batches)
    masks = [wanda_mask(w[3 * j : 3 * j + 3], n, 0.5) for j, n in enumerate(norms)]
    assert torch.equal(current_mask(wanda_model[0]), torch.cat(masks))


def test_wanda_layer_scope_on_a_grouped_conv_thresholds_each_group():
    model, batches = _grouped_conv()
    conv = model[0]
    w = weight_matrix(conv).clone()
    norms = _per_group(conv, batches, accumulate_act_norms)
    Wanda(sparsity=0.5, scope="layer", targets="0").apply(model, dataloader=batches)
    masks = [wanda_mask(w[3 * j : 3 * j + 3], n, 0.5, scope="layer") for j, n in enumerate(norms)]
    assert torch.equal(current_mask(conv), torch.cat(masks))
    assert not torch.equal(
        current_mask(conv),
        torch.cat([wanda_mask(w[3 * j : 3 * j + 3], n, 0.5) for j, n in enumerate(norms)]),
    )  # not the row scope's mask


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MagnitudePruning(pattern="2:4", targets="0"), r"pattern='2:4' .*\b0 has 9 inputs"),
        (lambda: Wanda(pattern="2:4", targets="0"), r"pattern='2:4' .*\b0 has 9 inputs"),
        (lambda: SparseGPT(pattern="2:4", targets="0"), r"pattern='2:4' .*\b0 has 9 inputs"),
    ],
    ids=["magnitude", "wanda", "sparsegpt"],
)
def test_two_four_sparsity_of_a_depthwise_3x3_conv_is_refused(make, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    weight = model[0].weight.detach().clone()
    with pytest.raises(PPQConfigError, match=match):
        make().apply(model, dataloader=[torch.randn(2, 4, 8, 8)])
    assert torch.equal(model[0].weight, weight) and get_state(model[0]) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: [MagnitudePruning(sparsity=0.5), QuantizationAwareTraining(bits=4)],
        lambda: [DeadZoneQuantization(bits=4, sparsity_weight=1.0)],
    ],
    ids=["qat-after-pruning", "dead-zone"],
)
def test_training_stages_in_fit_end_with_the_invariants_held(tmp_path, make):
    module = ImageClassifierModule(
        "resnet18", num_classes=10, model_kwargs=TINY_RESNET, learning_rate=0.01
    )
    start = {n: m.weight.detach().clone() for n, m in resolve_targets(module).items()}
    stages = make()
    make_trainer(tmp_path, stages, max_steps=3, limit_val_batches=0).fit(
        module, train_dataloaders=_loader()
    )
    targets = resolve_targets(module)
    assert check_invariants(module) == len(targets) == 20
    kinds = [s.kind.value for s in stages]
    for name, layer in targets.items():
        state = get_state(layer)
        assert [h["kind"] for h in state.history] == kinds, name
        assert state.grid.bits == 4 and state.mask is not None, name
        assert not torch.equal(layer.weight, start[name]), name
    assert stages[-1].result.summary.avg_bits == 4
    assert get_state(module.model.conv1) is None and get_state(module.model.fc) is None


def test_lora_adapts_the_convolutions_of_a_quantized_classifier_in_fit(tmp_path):
    module = ImageClassifierModule(
        "resnet18", num_classes=10, model_kwargs=TINY_RESNET, learning_rate=0.01
    )
    stages = [RTNQuantization(bits=4), LoRAFineTune(r=2)]
    make_trainer(tmp_path, stages, max_steps=2, limit_val_batches=0).fit(
        module, train_dataloaders=_loader()
    )
    adapted = lora_layers(module)
    assert len(adapted) == 20 and all(".conv" in n or "downsample" in n for n in adapted)
    assert check_invariants(module) == 20


def test_lora_rank_not_dividing_a_grouped_conv_is_refused_before_any_adapter(tmp_path):
    module = ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET)
    module.model.layer1[0].conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
    trainer_stage = LoRAFineTune(r=2)
    with pytest.raises(PPQConfigError, match=r"r=2 .*layer1\.0\.conv2 has groups=4"):
        trainer_stage.check_grouped_convs(resolve_targets(module))
    with pytest.raises(PPQConfigError, match=r"r=2 .*groups=4"):
        make_trainer(tmp_path, [trainer_stage], max_steps=1, limit_val_batches=0).fit(
            module, train_dataloaders=_loader()
        )
    assert not lora_layers(module)
    LoRAFineTune(r=4).check_grouped_convs(resolve_targets(module))  # a multiple: allowed
