"""A LightningModule for any timm or torchvision image classifier, evaluated by accuracy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.edits.loading import enable_state_loading, require_state_loading
from ppq_lightning.errors import PPQConfigError, check_bool, check_choice, check_int, check_number
from ppq_lightning.models.vision import load_image_classifier, stem_and_head

OPTIMIZERS = ("sgd", "adamw")


def check_training(
    learning_rate: Any,
    weight_decay: Any,
    momentum: Any,
    optimizer: Any,
    label_smoothing: Any,
    max_epochs_hint: Any,
) -> None:
    """Validate the training arguments of :class:`ImageClassifierModule`.

    Raises:
        PPQConfigError: naming the first bad argument and its value.
    """
    check_number("learning_rate", learning_rate, low=0, low_open=True)
    check_number("weight_decay", weight_decay, low=0)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)
    check_int("max_epochs_hint", max_epochs_hint, minimum=1, allow_none=True)


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` per row, in float32: how far a
    (compressed) model's predicted distribution is from a reference (dense) one."""
    reference = nn.functional.log_softmax(reference_logits.float(), dim=-1)
    predicted = nn.functional.log_softmax(logits.float(), dim=-1)
    return nn.functional.kl_div(predicted, reference, log_target=True, reduction="none").sum(-1)


def _classes_of(model: nn.Module) -> int:
    """The number of classes a classifier predicts (the last layer's outputs)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        head = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


class ImageClassifierModule(L.LightningModule):
    """Wraps an image classifier; validation and test report top-1 / top-5 accuracy and loss.

    Metrics (torchmetrics ``MulticlassAccuracy``, micro-averaged over all images): ``val/acc``,
    ``val/acc5``, ``val/loss`` (mean cross-entropy), the same under ``test/``, and
    ``train/loss`` / ``train/acc`` in ``fit``. :meth:`evaluate` returns ``{"acc", "acc5",
    "loss"}`` on any dataloader, so schedules and studies use ``M = acc``. Batches are
    ``(images, labels)``, or ``(images, labels, reference_logits)``: then ``kl``, the mean
    ``KL(softmax(reference) || softmax(logits))``, is reported too (with a dense model's logits
    and top-1 classes as reference and labels, ``acc`` is the top-1 agreement with it: how
    compressed models are compared where no labelled data exists).

    By default the first compressible layer (the stem convolution or the patch embedding) and
    the last (the classifier) are left out of every stage's default targets, as the
    compression literature does (``compress_stem``, ``compress_head``; explicit ``targets``
    always win).

    Args:
        model: a timm or torchvision model name, or a model this package ships
            (``fashion-mnist-resnet18``); see ``ppq_lightning.models.vision``.
        source: ``auto``, ``timm`` or ``torchvision``.
        pretrained: timm's pretrained weights (from the cache; a clear error offline).
        weights: torchvision's weights, e.g. ``"DEFAULT"`` or ``"IMAGENET1K_V1"``.
        num_classes: classes of the classifier (None: the model's default, 1000).
        in_chans: input channels (timm; e.g. 1 for Fashion-MNIST).
        model_kwargs: more constructor arguments of the model.
        checkpoint: a local weights file (safetensors, or a PyTorch file read with
            ``weights_only=True``).
        small_input: a 3x3 stride-1 stem without max-pool (ResNets on 28-32 px images).
        compress_stem, compress_head: let stages target the first and the last layer by
            default.
        learning_rate, weight_decay, momentum, optimizer (``sgd`` or ``adamw``),
        label_smoothing, max_epochs_hint: training in ``fit`` (cosine decay over
            ``max_epochs_hint`` epochs when given, else a constant rate).

    A compressed checkpoint loads with ``load_from_checkpoint`` (its recorded structural edits
    are replayed and its compression states attached, ``edits.enable_state_loading``); a plain
    ``load_state_dict`` of one refuses it with an error naming ``enable_state_loading``.

    Raises:
        PPQConfigError: on bad arguments (each named with its value: a bool that is not a
            bool, a learning rate <= 0, an unknown optimizer, ``max_epochs_hint`` not an
            integer >= 1, ...) or a model that cannot be built (see ``load_image_classifier``).

    Example (YAML)::

        model:
          class_path: ppq_lightning.models.ImageClassifierModule
          init_args: {model: resnet18, source: torchvision, weights: IMAGENET1K_V1}
    """

    metric_name = "acc"
    higher_is_better = True
    b_orig = 32  # bits of an original weight (vision models are trained and shipped in fp32)

    def __init__(
        self,
        model: str = "resnet18",
        source: str = "auto",
        pretrained: bool = False,
        weights: str | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        small_input: bool = False,
        compress_stem: bool = False,
        compress_head: bool = False,
        learning_rate: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        label_smoothing: float = 0.0,
        max_epochs_hint: int | None = None,
    ) -> None:
        super().__init__()
        for argument, value in (
            ("pretrained", pretrained),
            ("small_input", small_input),
            ("compress_stem", compress_stem),
            ("compress_head", compress_head),
        ):
            check_bool(argument, value)
        check_training(
            learning_rate, weight_decay, momentum, optimizer, label_smoothing, max_epochs_hint
        )
        self.save_hyperparameters()
        self.model = load_image_classifier(
            model,
            source,
            pretrained,
            weights,
            num_classes,
            in_chans,
            model_kwargs,
            checkpoint,
            small_input,
        )
        self._setup_metrics(compress_stem, compress_head)
        require_state_loading(self)

    def _setup_metrics(self, compress_stem: bool, compress_head: bool) -> None:
        classes = _classes_of(self.model)
        self.num_classes = classes
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(classes, top_k=min(5, classes), average="micro")
        self.test_acc = MulticlassAccuracy(classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(classes, top_k=min(5, classes), average="micro")
        stem, head = stem_and_head(self.model)
        self.default_ignore = [
            f"model.{name}"
            for name, keep in ((stem, compress_stem), (head, compress_head))
            if not keep
        ]

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        compress_stem: bool = False,
        compress_head: bool = False,
        **training: Any,
    ) -> ImageClassifierModule:
        """Wrap an already-built classifier (Python API; no hyperparameters are saved).

        Raises:
            PPQConfigError: when ``model`` is not an ``nn.Module``, ``compress_stem``/
                ``compress_head`` not a bool, or a training argument is unknown or bad.
        """
        if not isinstance(model, nn.Module):
            raise PPQConfigError(f"model={model!r} is not allowed: expected an nn.Module.")
        check_bool("compress_stem", compress_stem)
        check_bool("compress_head", compress_head)
        module = cls.__new__(cls)
        L.LightningModule.__init__(module)
        module.model = model.eval()
        defaults = {
            "learning_rate": 0.05,
            "weight_decay": 5e-4,
            "momentum": 0.9,
            "optimizer": "sgd",
            "label_smoothing": 0.0,
            "max_epochs_hint": None,
        }
        unknown = sorted(set(training) - set(defaults))
        if unknown:
            raise PPQConfigError(
                f"from_model got unknown arguments {unknown}; allowed {sorted(defaults)}."
            )
        hparams = {**defaults, **training}
        check_training(**{key: hparams[key] for key in defaults})
        module.hparams.update(hparams)
        module._setup_metrics(compress_stem, compress_head)
        require_state_loading(module)
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads a checkpoint's state dict: replay its recorded edits and
        attach its compression states (``edits.enable_state_loading``)."""
        enable_state_loading(self)

    def on_fit_start(self) -> None:
        """Train in training mode (BatchNorm statistics, dropout): the model is built in eval
        mode, and Lightning keeps the modes it finds (validation switches to eval and back)."""
        self.train()

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of images ``(B, C, H, W)``."""
        return self.model(images)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=self.hparams.label_smoothing
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy of a batch; logs ``train/loss`` and ``train/acc``."""
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self._loss(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", accuracy, prog_bar=True, batch_size=len(labels))
        return loss

    def _eval_step(self, batch: Any, split: str) -> Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        if len(batch) > 2:
            kl = kl_divergence(batch[2], logits).mean()
            self.log(f"{split}/kl", kl, on_step=False, on_epoch=True, batch_size=len(labels))
        acc, acc5 = getattr(self, f"{split}_acc"), getattr(self, f"{split}_acc5")
        acc.update(logits, labels)
        acc5.update(logits, labels)
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/acc5", acc5, on_step=False, on_epoch=True)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Updates ``val/acc`` and ``val/acc5``, logs ``val/loss``."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Updates ``test/acc`` and ``test/acc5``, logs ``test/loss``."""
        return self._eval_step(batch, "test")

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable[Any]) -> dict[str, float]:
        """Top-1 and top-5 accuracy (in [0, 1]) and mean cross-entropy over ``dataloader``,
        outside any Trainer loop, on the device of the weights, in eval mode (the previous
        mode is restored).

        Raises:
            PPQConfigError: when the dataloader yields no batch.
        """
        parameter = next(self.model.parameters(), None)
        device = self.device if parameter is None else parameter.device
        top1 = MulticlassAccuracy(self.num_classes, average="micro").to(device)
        top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro")
        top5 = top5.to(device)
        total, kl, count, referenced = 0.0, 0.0, 0, False
        with evaluating(self):  # every module gets its own mode back
            for batch in dataloader:
                images, labels = move_data_to_device((batch[0], batch[1]), device)
                logits = self(images)
                top1.update(logits, labels)
                top5.update(logits, labels)
                total += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                if len(batch) > 2:
                    kl += float(kl_divergence(batch[2].to(device), logits).sum())
                    referenced = True
                count += len(labels)
        if not count:
            raise PPQConfigError("the evaluation dataloader yielded no batch: no accuracy.")
        metrics = {
            "acc": float(top1.compute()),
            "acc5": float(top5.compute()),
            "loss": total / count,
        }
        return {**metrics, "kl": kl / count} if referenced else metrics

    def configure_optimizers(self) -> Any:
        """SGD with momentum (or AdamW), no weight decay on biases, norms and the learnable
        parameters of training-time quantizers (``.ppq_`` in their name); cosine decay over
        ``max_epochs_hint`` epochs when given."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim > 1 and ".ppq_" not in n]
        rest = [p for n, p in named if not (p.ndim > 1 and ".ppq_" not in n)]
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
        lr = self.hparams.learning_rate
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=self.hparams.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr)
        if not self.hparams.max_epochs_hint:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.hparams.max_epochs_hint
        )
        return {"optimizer": optimizer, "lr_scheduler": schedule}
