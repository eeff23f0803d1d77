"""Image classification data in the ImageNet folder layout, with a calibration split drawn from
the train images; the transforms and splits every image datamodule shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ppq_lightning.datamodules.stateful import ordered_dataloader, shuffled_dataloader
from ppq_lightning.errors import PPQConfigError, bad_value, check_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TRANSFORM_FROM = "None, 'timm:<model name>' or 'torchvision:<weights enum>'"


def check_folder_path(argument: str, value: Any) -> str:
    """A path argument: a string (or ``os.PathLike``), returned as a string.

    Raises:
        PPQConfigError: when ``value`` is not a path.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise bad_value(argument, value, "a folder path")
    return str(value)


def check_transform_from(value: Any) -> str | None:
    """Validate ``transform_from`` without building anything: the timm model name must be in
    timm's registry (with a known pretrained tag, if any), the torchvision weights must exist.

    Raises:
        PPQConfigError: on another form, an unknown timm model or unknown torchvision weights.
    """
    if value is None:
        return None
    if not isinstance(value, str) or value.partition(":")[0] not in ("timm", "torchvision"):
        raise bad_value("transform_from", value, _TRANSFORM_FROM)
    kind, _, name = value.partition(":")
    if kind == "timm":
        import timm
        from timm.models import get_pretrained_cfg

        known = timm.is_model(name)
        if known:
            try:
                get_pretrained_cfg(name)  # an unknown pretrained tag raises
            except RuntimeError:
                known = False
        if not known:
            raise bad_value(
                "transform_from",
                value,
                "'timm:' and a model name of timm's registry (timm.list_models(), e.g. "
                "'timm:resnet18' or 'timm:resnet18.a1_in1k'; hub names are not read offline)",
            )
        return value
    from torchvision.models import get_weight

    try:
        get_weight(name)
    except (KeyError, ValueError) as err:
        raise bad_value(
            "transform_from",
            value,
            "'torchvision:' and a weights enum of torchvision.models (e.g. 'torchvision:"
            "ResNet18_Weights.IMAGENET1K_V1' or 'torchvision:ResNet18_Weights.DEFAULT')",
        ) from err
    return value


def eval_transform(transform_from: str | None, image_size: int = 224) -> Any:
    """The evaluation transform of a model family, PIL image -> normalised ``(C, H, W)`` float.

    Args:
        transform_from: None for the standard ImageNet transform (resize to
            ``int(image_size / 0.875)``, center crop ``image_size``, ImageNet mean/std);
            ``"timm:<model name>"`` for timm's eval transform of that model (its pretrained
            config, read from timm's registry: nothing is downloaded);
            ``"torchvision:<weights enum>"`` for
            ``torchvision.models.get_weight(name).transforms()``.
        image_size: the crop of the standard transform (ignored for timm and torchvision).

    Raises:
        PPQConfigError: on an unknown model or weights name.
    """
    check_transform_from(transform_from)
    if transform_from is None:
        return transforms.Compose(
            [
                transforms.Resize(int(image_size / 0.875)),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    kind, _, name = transform_from.partition(":")
    if kind == "timm":
        import timm
        import timm.data

        model = timm.create_model(name, pretrained=False)
        config = timm.data.resolve_data_config({}, model=model)
        return timm.data.create_transform(**config)
    from torchvision.models import get_weight

    return get_weight(name).transforms()


def _has_image(folder: str) -> bool:
    """Whether ``folder`` (or a folder below it) holds a file ImageFolder reads; stops at the
    first one."""
    for path, _, files in os.walk(folder, followlinks=True):
        if any(has_file_allowed_extension(os.path.join(path, f), IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_image_folder(folder: str, argument: str) -> list[str]:
    """The class names of an ImageFolder split: ``folder/<class>/*.jpg``.

    Args:
        folder: the split's folder.
        argument: the argument that named it, for the messages (``"val_dir"``).

    Raises:
        PPQConfigError: when ``folder`` has no class sub-folders, or a class folder has no
            images (extensions of ``torchvision.datasets.folder.IMG_EXTENSIONS``).
    """
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise PPQConfigError(
            f"{argument}: the folder {folder} has no class sub-folders; expected "
            f"{folder}/<class>/<image> (the ImageNet layout)."
        )
    for name in classes:
        if not _has_image(os.path.join(folder, name)):
            raise PPQConfigError(
                f"{argument}: the class folder {os.path.join(folder, name)} has no images "
                f"(files ending in {', '.join(IMG_EXTENSIONS)})."
            )
    return classes


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class ImageSplits(L.LightningDataModule):
    """What the image datamodules share: a train dataset (training and calibration), an
    evaluation dataset (validation and test), the seeded subsets and the dataloaders.
    Subclasses set the arguments and implement ``_datasets()``."""

    batch_size: int
    num_workers: int
    num_calibration_samples: int
    max_eval_samples: int | None
    seed: int
    train_set: Dataset | None
    eval_set: Dataset | None
    calibration_indices: list[int]
    eval_indices: list[int]

    def _datasets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets and draw the subsets once (later calls do nothing)."""
        if self.train_set is not None:
            return
        train_set, eval_set = self._datasets()
        n_train, n_eval = len(train_set), len(eval_set)
        if self.num_calibration_samples > n_train:
            raise bad_value(
                "num_calibration_samples",
                self.num_calibration_samples,
                f"at most the {n_train} train images of {self._where()}",
            )
        # a seeded draw of the train images: calibration never sees an evaluation image
        self.calibration_indices = _permutation(n_train, self.seed)[: self.num_calibration_samples]
        if self.max_eval_samples is None or self.max_eval_samples >= n_eval:
            self.eval_indices = list(range(n_eval))
        else:
            self.eval_indices = _permutation(n_eval, self.seed)[: self.max_eval_samples]
        self.train_set, self.eval_set = train_set, eval_set

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return ordered_dataloader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, **kwargs
        )

    def calibration_dataloader(self) -> DataLoader:
        """``num_calibration_samples`` train images (a seeded draw), for layer-wise compression
        methods (sets up the data itself)."""
        self.setup()
        return self._loader(Subset(self.train_set, self.calibration_indices))

    def train_dataloader(self) -> StatefulDataLoader:
        """All train images, shuffled (epoch ``e`` from ``seed + e``), with the evaluation
        transform. A ``StatefulDataLoader``: a ``fit`` resumed mid-epoch reads the batches the
        uninterrupted one would (``datamodules.stateful``)."""
        self.setup()
        return shuffled_dataloader(
            self.train_set, self.seed, batch_size=self.batch_size, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """The evaluation images, in a fixed order."""
        self.setup()
        return self._loader(Subset(self.eval_set, self.eval_indices))

    def test_dataloader(self) -> DataLoader:
        """The same images as ``val_dataloader``."""
        return self.val_dataloader()


class ImageFolderDataModule(ImageSplits):
    """Images in the ImageNet layout, ``root/<train_dir>/<class>/*.jpg`` and
    ``root/<val_dir>/<class>/*.jpg``, read with ``torchvision.datasets.ImageFolder``.

    Evaluation (validation and test) uses ``val_dir``: all of it in file order, or the first
    ``max_eval_samples`` of a seeded permutation. Calibration uses a seeded draw of
    ``num_calibration_samples`` images of ``train_dir``, so it never sees an evaluation image;
    training uses all of ``train_dir``, shuffled (seeded). Every split gets the evaluation
    transform (no augmentation). Both folders must hold the same class folders (the label of
    a class is its index in sorted order). Batches are ``(images, labels)``: float
    ``(B, 3, H, W)`` and long ``(B,)``.

    Args:
        root: the dataset's folder.
        train_dir: the train split's folder under ``root``.
        val_dir: the evaluation split's folder under ``root``.
        transform_from: None for the standard ImageNet evaluation transform (resize to
            ``int(image_size / 0.875)``, center crop ``image_size``, ImageNet mean/std);
            ``"timm:<model name>"`` for timm's evaluation transform of that model (from timm's
            registry, offline); ``"torchvision:<weights enum>"`` (e.g.
            ``"torchvision:ResNet18_Weights.IMAGENET1K_V1"``) for those weights' transforms.
        image_size: the crop of the standard transform (ignored with ``transform_from``).
        batch_size: images per batch.
        num_workers: dataloader worker processes.
        num_calibration_samples: calibration images, at most the number of train images.
        max_eval_samples: keep only this many evaluation images (None: all).
        seed: seed of the calibration draw, the evaluation subset and the training shuffle.

    Raises:
        PPQConfigError: on an invalid argument, an unknown timm model or torchvision weights,
            a missing ``root``, train or val folder (here), or, in ``setup``, a split without
            class folders, a class folder without images, splits with different classes, or
            fewer train images than ``num_calibration_samples``.

    Example (YAML)::

        data:
          class_path: ppq_lightning.datamodules.ImageFolderDataModule
          init_args: {root: /data/imagenet, transform_from: "timm:resnet18", max_eval_samples: 5000}
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        transform_from: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        num_calibration_samples: int = 256,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        root = check_folder_path("root", root)
        train_dir = check_folder_path("train_dir", train_dir)
        val_dir = check_folder_path("val_dir", val_dir)
        check_int("image_size", image_size, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("num_calibration_samples", num_calibration_samples, minimum=1)
        check_int("max_eval_samples", max_eval_samples, minimum=1, allow_none=True)
        check_int("seed", seed)
        check_transform_from(transform_from)
        if not Path(root).is_dir():
            raise bad_value("root", root, "an existing folder holding the train and val folders")
        for argument, folder in (("train_dir", train_dir), ("val_dir", val_dir)):
            if not (Path(root) / folder).is_dir():
                raise bad_value(argument, folder, f"a folder under root={root!r}")
        self.save_hyperparameters()
        self.root, self.train_dir, self.val_dir = root, train_dir, val_dir
        self.transform_from, self.image_size = transform_from, image_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.num_calibration_samples = num_calibration_samples
        self.max_eval_samples = max_eval_samples
        self.train_set: datasets.ImageFolder | None = None
        self.eval_set: datasets.ImageFolder | None = None
        self.calibration_indices: list[int] = []
        self.eval_indices: list[int] = []

    def _where(self) -> str:
        return os.path.join(self.root, self.train_dir)

    def _datasets(self) -> tuple[Dataset, Dataset]:
        train_folder = os.path.join(self.root, self.train_dir)
        val_folder = os.path.join(self.root, self.val_dir)
        train_classes = check_image_folder(train_folder, "train_dir")
        val_classes = check_image_folder(val_folder, "val_dir")
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise PPQConfigError(
                f"train_dir={self.train_dir!r} and val_dir={self.val_dir!r} hold different class "
                f"folders ({len(train_classes)} and {len(val_classes)}; only in train: "
                f"{only_train}, only in val: {only_val}); the labels are the class folders' "
                "indices in sorted order, so both splits need the same classes."
            )
        transform = eval_transform(self.transform_from, self.image_size)
        return (
            datasets.ImageFolder(train_folder, transform=transform),
            datasets.ImageFolder(val_folder, transform=transform),
        )
