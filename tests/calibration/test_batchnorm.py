import copy

import pytest
import torch
from torch import nn

from ppq_lightning.calibration.batchnorm import batchnorm_layers, recalibrate_batchnorm
from ppq_lightning.callbacks import MagnitudePruning
from ppq_lightning.errors import PPQConfigError


def _cnn(seed: int = 0) -> nn.Sequential:
    """Conv-BN blocks with a dropout between them (it must be off while recalibrating)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16, momentum=0.3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _batches(n: int = 3, size: int = 6, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [2 + 3 * torch.randn(size, 3, 12, 12, generator=generator) for _ in range(n)]


def _bn_input_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Per BatchNorm: the mean of its per-batch input means and unbiased variances, with the
    BatchNorm layers in training mode and every other module in eval mode (a copy of model)."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, bn in batchnorm_layers(model).items():
        bn.train()
        bn.register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, []).append(args[0])
        )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return {
        name: (
            torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0),
            torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0),
            torch.cat(inputs).mean(dim=(0, 2, 3)),
        )
        for name, inputs in seen.items()
    }


def test_batchnorm_layers_finds_those_that_track_running_statistics():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False)
    )
    model.add_module("bn1d", nn.BatchNorm1d(4))
    assert list(batchnorm_layers(model)) == ["1", "bn1d"]
    assert batchnorm_layers(nn.Sequential(nn.Linear(2, 2))) == {}


def test_recalibration_is_the_exact_average_of_the_batchnorm_inputs():
    model, batches = _cnn(), _batches()
    expected = _bn_input_statistics(model, batches)
    recalibrate_batchnorm(model, batches)
    for name, bn in batchnorm_layers(model).items():
        mean, var, overall_mean = expected[name]
        assert torch.allclose(bn.running_mean, mean, atol=1e-5), name
        assert torch.allclose(bn.running_var, var, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(bn.running_mean, overall_mean, atol=1e-5), name  # equal batches
        assert int(bn.num_batches_tracked) == len(batches), name


def test_recalibration_does_not_depend_on_the_old_statistics():
    model, batches = _cnn(), _batches()
    other = copy.deepcopy(model)
    for bn in batchnorm_layers(other).values():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(0.01)
        bn.num_batches_tracked.fill_(100)
    recalibrate_batchnorm(model, batches)
    recalibrate_batchnorm(other, batches)
    for name, bn in batchnorm_layers(model).items():
        assert torch.equal(bn.running_mean, batchnorm_layers(other)[name].running_mean)
        assert torch.equal(bn.running_var, batchnorm_layers(other)[name].running_var)


def test_recalibration_restores_momenta_and_modes_and_leaves_weights_alone():
    model, batches = _cnn(), _batches()
    model.train()
    model[3].eval()  # a mix of modes, each kept
    modes = {name: module.training for name, module in model.named_modules()}
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    recalibrate_batchnorm(model, batches)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert (model[1].momentum, model[5].momentum) == (0.1, 0.3)
    assert all(torch.equal(p, parameters[name]) for name, p in model.named_parameters())


def test_recalibration_returns_how_far_the_statistics_moved():
    model, batches = _cnn(), _batches()
    assert all(
        torch.equal(bn.running_var, torch.ones_like(bn.running_var)) for bn in (model[1], model[5])
    )
    model[1].running_mean.fill_(1.0)  # a non-zero mean to measure the shift against
    old_mean = model[1].running_mean.clone()
    metrics = recalibrate_batchnorm(model, batches)
    assert set(metrics) == {"1", "5"}
    shift = (model[1].running_mean - old_mean).norm() / old_mean.norm()
    assert metrics["1"]["mean_shift"] == pytest.approx(float(shift), rel=1e-5)
    assert metrics["1"]["var_ratio"] == pytest.approx(float(model[1].running_var.mean()), rel=1e-5)
    assert metrics["5"]["var_ratio"] == pytest.approx(float(model[5].running_var.mean()), rel=1e-5)


def test_recalibration_of_chosen_layers_only():
    model, batches = _cnn(), _batches()
    untouched = (model[5].running_mean.clone(), model[5].running_var.clone())
    metrics = recalibrate_batchnorm(model, batches, layers={"1": model[1]})
    assert set(metrics) == {"1"}
    assert torch.equal(model[5].running_mean, untouched[0])
    assert torch.equal(model[5].running_var, untouched[1])
    assert not torch.equal(model[1].running_var, torch.ones(8))


def test_recalibration_with_a_custom_forward():
    model, batches = _cnn(), _batches()
    wrapped = [{"pixels": x} for x in batches]
    calls = []

    def forward(module, batch):
        calls.append(module.training)
        return module(batch["pixels"])

    recalibrate_batchnorm(model, wrapped, forward=forward)
    reference = _cnn()
    recalibrate_batchnorm(reference, batches)
    assert calls == [False, False, False]  # the model itself in eval mode, BatchNorm in train
    assert torch.equal(model[5].running_mean, reference[5].running_mean)


def test_recalibration_errors():
    with pytest.raises(PPQConfigError, match=r"found no BatchNorm layer"):
        recalibrate_batchnorm(nn.Sequential(nn.Linear(3, 3)), [torch.ones(2, 3)])
    model = _cnn()
    before = model[1].running_var.clone()
    with pytest.raises(PPQConfigError, match=r"needs calibration batches; none were given"):
        recalibrate_batchnorm(model, iter([]))
    assert torch.equal(model[1].running_var, before)


def _toy_task(n: int, seed: int, patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return torch.randn(n, 3, 16, 16, generator=generator) + patterns[labels], labels


def test_recalibration_after_heavy_pruning_recovers_the_dense_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    patterns = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(100):
        images, labels = _toy_task(32, step, patterns)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images, test_labels = _toy_task(512, 1000, patterns)
    with torch.no_grad():
        dense = model(test_images)
    assert (dense.argmax(1) == test_labels).float().mean() > 0.95  # the task is learnt

    MagnitudePruning(sparsity=0.7).apply(model)
    with torch.no_grad():
        pruned = model(test_images)
    calibration = [_toy_task(64, 2000 + i, patterns) for i in range(8)]
    recalibrate_batchnorm(model, calibration)
    with torch.no_grad():
        recalibrated = model(test_images)

    def accuracy(logits):
        return (logits.argmax(1) == test_labels).float().mean().item()

    def error(logits):
        return (logits - dense).pow(2).mean().item()

    assert accuracy(recalibrated) >= accuracy(pruned)
    assert error(recalibrated) < 0.75 * error(pruned)
