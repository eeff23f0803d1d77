import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.models.image_classifier import kl_divergence
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import make_trainer

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def _module(**kwargs) -> ImageClassifierModule:
    return ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET, **kwargs)


def _data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def _loader(*tensors: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


class ModeProbe:
    """Records whether the model and a BatchNorm were in training mode at each forward."""

    def __init__(self, module: ImageClassifierModule) -> None:
        self.modes: list[tuple[bool, bool]] = []
        bn = module.model.bn1
        module.model.register_forward_pre_hook(
            lambda m, args: self.modes.append((m.training, bn.training))
        )


# -- evaluate ---------------------------------------------------------------------------------


def test_evaluate_reports_accuracy_top5_and_loss_exactly():
    module = _module()
    images, labels = _data()
    with torch.no_grad():
        logits = module(images)  # the model is built in eval mode
    metrics = module.evaluate(_loader(images, labels))
    assert set(metrics) == {"acc", "acc5", "loss"}
    top5 = logits.topk(5, dim=1).indices
    assert metrics["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert metrics["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    assert 0 <= metrics["acc"] <= metrics["acc5"] <= 1
    assert metrics["loss"] > 0


def test_evaluate_with_reference_logits_reports_kl():
    module = _module()
    images, labels = _data()
    with torch.no_grad():
        own = module(images)
    same = module.evaluate(_loader(images, labels, own))
    assert set(same) == {"acc", "acc5", "loss", "kl"}
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    other = own + torch.randn(own.shape, generator=torch.Generator().manual_seed(1))
    shifted = module.evaluate(_loader(images, labels, other))
    assert shifted["kl"] > 1e-3
    assert shifted["kl"] == pytest.approx(kl_divergence(other, own).mean().item(), rel=1e-5)
    # the top-1 agreement with a reference: its own top-1 classes as labels give acc == 1
    assert module.evaluate(_loader(images, own.argmax(1), own))["acc"] == 1.0


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_runs_in_eval_mode_and_restores_the_mode(training):
    module = _module()
    module.train(training)
    probe = ModeProbe(module)
    module.evaluate(_loader(*_data(8)))
    assert probe.modes == [(False, False), (False, False)]
    assert module.training is training
    assert module.model.training is training and module.model.bn1.training is training


def test_evaluate_keeps_the_eval_mode_of_a_freshly_built_model():
    module = _module()
    assert module.training and not module.model.training  # as built
    images, labels = _data(8)
    with torch.no_grad():
        before = module(images)
    module.evaluate(_loader(images, labels))
    assert not module.model.training and not module.model.bn1.training
    with torch.no_grad():
        assert torch.equal(module(images), before)


def test_evaluate_on_an_empty_dataloader_is_an_error():
    module = _module()
    module.train()
    with pytest.raises(PPQConfigError, match=r"evaluation dataloader yielded no batch"):
        module.evaluate([])
    assert module.training  # restored even on error


def test_kl_divergence_per_row():
    reference = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    logits = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    kl = kl_divergence(reference, logits)
    p = reference.softmax(-1)
    expected = (p * (p.log() - logits.log_softmax(-1))).sum(-1)
    assert kl.shape == (2,) and kl.dtype == torch.float32
    assert torch.allclose(kl, expected)
    assert kl[0] > 0 and kl[1] == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(reference.half(), logits.half()).dtype == torch.float32


# -- through a real Trainer --------------------------------------------------------------------


def test_validate_and_test_log_accuracy_and_loss(tmp_path):
    module = _module()
    images, labels = _data()
    expected = module.evaluate(_loader(images, labels))
    trainer = make_trainer(tmp_path)
    (validated,) = trainer.validate(module, dataloaders=_loader(images, labels), verbose=False)
    assert set(validated) == {"val/acc", "val/acc5", "val/loss"}
    for key in ("acc", "acc5", "loss"):
        assert validated[f"val/{key}"] == pytest.approx(expected[key], rel=1e-5)
    (tested,) = trainer.test(module, dataloaders=_loader(images, labels), verbose=False)
    assert set(tested) == {"test/acc", "test/acc5", "test/loss"}
    assert tested["test/acc"] == pytest.approx(expected["acc"])


def test_validate_with_reference_logits_logs_kl(tmp_path):
    module = _module()
    images, labels = _data()
    with torch.no_grad():
        own = module(images)
    (validated,) = make_trainer(tmp_path).validate(
        module, dataloaders=_loader(images, labels, own), verbose=False
    )
    assert validated["val/kl"] == pytest.approx(0.0, abs=1e-6)


def test_fit_trains_in_training_mode_and_the_loss_falls(tmp_path):
    module = _module(small_input=True, learning_rate=0.05)
    assert not module.model.training  # built in eval mode
    images, labels = _data(16)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    probe = ModeProbe(module)
    running_mean = module.model.bn1.running_mean.clone()
    trainer = make_trainer(tmp_path, [Losses()], max_steps=8, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(images, labels, batch_size=16))
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0]  # one batch, memorised
    assert probe.modes == [(True, True)] * 8
    assert not torch.equal(module.model.bn1.running_mean, running_mean)
    assert trainer.callback_metrics["train/loss"] == pytest.approx(losses[-1])


# -- default targets -------------------------------------------------------------------------


def test_default_ignore_leaves_out_the_stem_and_the_classifier():
    module = _module()
    assert module.default_ignore == ["model.conv1", "model.fc"]
    targets = resolve_targets(module)
    assert "model.conv1" not in targets and "model.fc" not in targets
    assert len(targets) == 20  # 16 block convolutions and 4 downsampling ones
    assert set(resolve_targets(module, targets=r"model\.(conv1|fc)$")) == {
        "model.conv1",
        "model.fc",
    }  # explicit targets win


@pytest.mark.parametrize(
    ("stem", "head", "ignored"),
    [(True, False, ["model.fc"]), (False, True, ["model.conv1"]), (True, True, [])],
)
def test_compress_stem_and_head_make_them_default_targets(stem, head, ignored):
    module = _module(compress_stem=stem, compress_head=head)
    assert module.default_ignore == ignored
    targets = resolve_targets(module)
    assert ("model.conv1" in targets) is stem
    assert ("model.fc" in targets) is head
    assert len(targets) == 20 + stem + head


def test_default_ignore_of_a_vit():
    module = ImageClassifierModule("vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT)
    assert module.default_ignore == ["model.patch_embed.proj", "model.head"]
    assert module.num_classes == 10
    targets = resolve_targets(module)
    assert len(targets) == 8 and all(".blocks." in name for name in targets)


# -- from_model and training settings --------------------------------------------------------


def test_from_model_wraps_a_built_classifier():
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).train()
    module = ImageClassifierModule.from_model(model, compress_head=True, learning_rate=0.1)
    assert module.model is model and not model.training
    assert module.num_classes == 10
    assert module.default_ignore == ["model.features.0.0"]
    assert module.hparams.learning_rate == 0.1 and module.hparams.optimizer == "sgd"
    assert module.hparams.momentum == 0.9 and module.hparams.max_epochs_hint is None
    assert "model.classifier.1" in resolve_targets(module)
    images, labels = _data(4)
    metrics = module.evaluate(_loader(images, labels))
    assert 0 <= metrics["acc"] <= metrics["acc5"] <= 1


def test_from_model_refuses_unknown_arguments():
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
    with pytest.raises(PPQConfigError, match=r"from_model got unknown arguments \['lr'\]"):
        ImageClassifierModule.from_model(model, lr=0.1)
    with pytest.raises(PPQConfigError, match=r"learning_rate='0.1' is not allowed"):
        ImageClassifierModule.from_model(model, learning_rate="0.1")
    with pytest.raises(PPQConfigError, match=r"compress_head='yes' is not allowed"):
        ImageClassifierModule.from_model(model, compress_head="yes")
    with pytest.raises(PPQConfigError, match=r"model='resnet18' is not allowed: expected an nn"):
        ImageClassifierModule.from_model("resnet18")


def test_a_compressed_checkpoint_loads_with_load_from_checkpoint(tmp_path):
    from ppq_lightning import check_invariants
    from ppq_lightning.callbacks import MagnitudePruning

    module = _module(small_input=True)
    images, labels = _data(4)
    trainer = make_trainer(tmp_path, [MagnitudePruning(0.5)])
    trainer.validate(module, _loader(images, labels), verbose=False)
    trainer.save_checkpoint(tmp_path / "p.ckpt")
    with pytest.raises(
        PPQConfigError, match=r"compression state .*edits\.enable_state_loading\(model\)"
    ):
        _module(small_input=True).load_state_dict(module.state_dict())
    loaded = ImageClassifierModule.load_from_checkpoint(tmp_path / "p.ckpt")
    assert check_invariants(loaded) == check_invariants(module) > 0


def test_configure_optimizers_sgd_without_decay_on_biases_and_norms():
    module = _module(learning_rate=0.1, weight_decay=1e-3, momentum=0.8)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    decay, rest = optimizer.param_groups
    assert (decay["weight_decay"], rest["weight_decay"]) == (1e-3, 0.0)
    assert decay["lr"] == 0.1 and decay["momentum"] == 0.8
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(module.parameters()))
    assert any(p is module.model.fc.bias for p in rest["params"])
    assert any(p is module.model.bn1.weight for p in rest["params"])


def test_configure_optimizers_adamw_with_cosine_decay():
    module = _module(optimizer="adamw", learning_rate=1e-3, max_epochs_hint=4)
    configured = module.configure_optimizers()
    assert isinstance(configured["optimizer"], torch.optim.AdamW)
    schedule = configured["lr_scheduler"]
    assert isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert schedule.T_max == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, r"optimizer='adam' is not allowed: expected one of sgd, adamw"),
        ({"momentum": 1.0}, r"momentum=1.0 is not allowed: expected a number in \[0, 1\)"),
        ({"learning_rate": 0}, r"learning_rate=0 is not allowed: expected a number > 0"),
        ({"pretrained": "yes"}, r"pretrained='yes' is not allowed: expected true or false"),
        ({"small_input": 1}, r"small_input=1 is not allowed"),
        ({"compress_head": None}, r"compress_head=None is not allowed"),
        ({"weight_decay": -1.0}, r"weight_decay=-1.0 is not allowed"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 is not allowed"),
        ({"model": "no_such_net"}, r"model='no_such_net' is not allowed"),
        ({"model": 18}, r"model=18 is not allowed: expected a timm or torchvision model name"),
        ({"num_classes": "10"}, r"num_classes='10' is not allowed: expected None or an integer"),
        ({"in_chans": 0}, r"in_chans=0 is not allowed"),
        ({"max_epochs_hint": 2.5}, r"max_epochs_hint=2.5 is not allowed"),
        ({"model_kwargs": "wide"}, r"model_kwargs='wide' is not allowed: expected None or a dict"),
        ({"weights": 1}, r"weights=1 is not allowed"),
        ({"checkpoint": 3}, r"checkpoint=3 is not allowed"),
    ],
)
def test_bad_arguments(kwargs, match):
    arguments = {"model": "resnet18", "num_classes": 10, "model_kwargs": TINY_RESNET, **kwargs}
    with pytest.raises(PPQConfigError, match=match):
        ImageClassifierModule(**arguments)
