"""Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision, with a calibration split drawn
from the train images; Fashion-MNIST also offline, from Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
import shutil
from typing import Any, NamedTuple
from urllib.error import URLError

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ppq_lightning.datamodules.images import ImageSplits, check_folder_path
from ppq_lightning.errors import PPQConfigError, bad_value, check_bool, check_choice, check_int
from ppq_lightning.reports import atomic_write

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
"""Where Debian's package ``dataset-fashion-mnist`` puts the four gzipped IDX files."""


class _Vision(NamedTuple):
    """A torchvision dataset class, its channel mean and std, its channels."""

    cls: type
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int


VISION_DATASETS = {
    "fashion_mnist": _Vision(datasets.FashionMNIST, (0.2860,), (0.3530,), 1),
    "cifar10": _Vision(datasets.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 3),
    "cifar100": _Vision(datasets.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 3),
}


def unpack_gzip(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Gunzip ``source`` into ``target`` atomically (``reports.atomic_write``), so a reader
    never sees half a file."""
    with atomic_write(target, "wb") as out, gzip.open(source, "rb") as data:
        shutil.copyfileobj(data, out, length=1 << 20)


class VisionDataModule(ImageSplits):
    """Fashion-MNIST, CIFAR-10 or CIFAR-100 through torchvision, with a calibration split.

    The train split (60000 or 50000 images) feeds training (shuffled, seeded) and calibration
    (a seeded draw of ``num_calibration_samples`` images); the test split (10000 images) feeds
    validation and test: all of it in order, or the first ``max_eval_samples`` of a seeded
    permutation. Images are normalised with the dataset's channel mean and std, after an
    optional resize. Batches are ``(images, labels)``: float ``(B, C, H, W)`` and long ``(B,)``.

    Files: torchvision's layout under ``root`` (``root/FashionMNIST/raw/``,
    ``root/cifar-10-batches-py/``, ``root/cifar-100-python/``). When they are missing,
    Fashion-MNIST is first unpacked from ``system_dir`` (Debian's ``dataset-fashion-mnist``
    ships the four gzipped IDX files there; it is the same data torchvision downloads), then
    ``download=True`` downloads (needs network); otherwise an error says where to put them.

    Args:
        dataset: ``fashion_mnist``, ``cifar10`` or ``cifar100``.
        root: the folder of the dataset files.
        download: download missing files with torchvision (needs network).
        image_size: resize the images to ``image_size`` squared (None: 28 or 32, as stored).
        channels: None for the dataset's own (1 or 3); 3 turns Fashion-MNIST's gray channel
            into three equal ones, for models made for RGB; 1 only for Fashion-MNIST.
        batch_size: images per batch.
        num_workers: dataloader worker processes.
        num_calibration_samples: calibration images, drawn from the train split.
        max_eval_samples: keep only this many test images (None: all 10000).
        seed: seed of the calibration draw, the evaluation subset and the training shuffle.
        system_dir: a folder holding Fashion-MNIST's four ``*-ubyte.gz`` files (None: none).

    Raises:
        PPQConfigError: on an invalid argument; in ``prepare_data`` or ``setup``, when the files
            are missing (naming ``download=True`` and, for Fashion-MNIST,
            ``apt-get install dataset-fashion-mnist``), a download fails, or files are corrupt.

    Example (YAML)::

        data:
          class_path: ppq_lightning.datamodules.VisionDataModule
          init_args: {dataset: fashion_mnist, root: data, channels: 3, max_eval_samples: 2000}
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str = "data",
        download: bool = False,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        num_calibration_samples: int = 512,
        max_eval_samples: int | None = None,
        seed: int = 0,
        system_dir: str | None = DEBIAN_FASHION_MNIST,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, VISION_DATASETS)
        root = check_folder_path("root", root)
        check_bool("download", download)
        check_int("image_size", image_size, minimum=1, allow_none=True)
        check_choice("channels", channels, (None, 1, 3))
        if channels == 1 and dataset != "fashion_mnist":
            raise bad_value(
                "channels", channels, f"None or 3 for dataset={dataset!r} (1 is for fashion_mnist)"
            )
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("num_calibration_samples", num_calibration_samples, minimum=1)
        check_int("max_eval_samples", max_eval_samples, minimum=1, allow_none=True)
        check_int("seed", seed)
        if system_dir is not None:
            system_dir = check_folder_path("system_dir", system_dir)
        self.save_hyperparameters()
        self.dataset, self.root, self.download = dataset, root, download
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.num_calibration_samples = num_calibration_samples
        self.max_eval_samples = max_eval_samples
        self.system_dir = system_dir
        self.spec = VISION_DATASETS[dataset]
        self.train_set: Dataset | None = None
        self.eval_set: Dataset | None = None
        self.calibration_indices: list[int] = []
        self.eval_indices: list[int] = []

    def _folder(self) -> str:
        """The folder torchvision reads the files from."""
        if self.dataset == "fashion_mnist":
            return os.path.join(self.root, "FashionMNIST", "raw")
        return os.path.join(self.root, self.spec.cls.base_folder)

    def _files(self) -> list[str]:
        """The names torchvision needs in ``_folder()``: for Fashion-MNIST its ``_check_exists``
        wants the resources without ``.gz`` and only checks that they exist (no md5); CIFAR's
        ``_check_integrity`` also checks their md5 (a corrupt file fails in ``setup``)."""
        cls = self.spec.cls
        if self.dataset == "fashion_mnist":
            return [os.path.splitext(name)[0] for name, _ in cls.resources]
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def _missing(self) -> list[str]:
        folder = self._folder()
        return [name for name in self._files() if not os.path.isfile(os.path.join(folder, name))]

    def _where(self) -> str:
        return f"dataset={self.dataset!r} in {self._folder()}"

    def _unpack_system_files(self, missing: list[str]) -> bool:
        """Gunzip Fashion-MNIST's missing files from ``system_dir``; False when it lacks one."""
        if self.dataset != "fashion_mnist" or self.system_dir is None:
            return False
        sources = [os.path.join(self.system_dir, f"{name}.gz") for name in missing]
        if not all(os.path.isfile(source) for source in sources):
            return False
        folder = self._folder()
        try:
            os.makedirs(folder, exist_ok=True)
            for source, name in zip(sources, missing, strict=True):
                unpack_gzip(source, os.path.join(folder, name))
        except OSError as err:  # EOFError and gzip.BadGzipFile are OSErrors too
            raise PPQConfigError(
                f"dataset={self.dataset!r}: could not unpack the files of system_dir="
                f"{self.system_dir!r} into {folder} ({type(err).__name__}: {err})."
            ) from err
        return True

    def _not_found(self) -> PPQConfigError:
        folder = self._folder()
        text = (
            f"dataset={self.dataset!r}: its files are not in root={self.root!r} (torchvision "
            f"reads {', '.join(self._files())} in {folder}); pass download=True to download "
            "them (needs network), or put them there"
        )
        if self.dataset == "fashion_mnist":
            text += (
                f", or install Debian's package (`apt-get install dataset-fashion-mnist`), "
                f"which ships them gzipped in {DEBIAN_FASHION_MNIST} (read through system_dir, "
                f"now {self.system_dir!r})"
            )
        return PPQConfigError(text + ".")

    def _download(self) -> None:
        try:  # the train split's constructor downloads the files of both splits
            self.spec.cls(self.root, train=True, download=True)
        except (URLError, OSError, RuntimeError) as err:
            reason = str(err).splitlines()[0] if str(err) else ""
            raise PPQConfigError(
                f"dataset={self.dataset!r} could not be downloaded ({type(err).__name__}: "
                f"{reason}); download=True needs network access. Offline, put the files "
                f"{', '.join(self._files())} in {self._folder()}"
                + (
                    " (`apt-get install dataset-fashion-mnist` ships them gzipped in "
                    f"{DEBIAN_FASHION_MNIST})."
                    if self.dataset == "fashion_mnist"
                    else "."
                )
            ) from err

    def prepare_data(self) -> None:
        """Make sure the files are in ``root``: there already, unpacked from ``system_dir``
        (Fashion-MNIST), or downloaded (``download=True``).

        Raises:
            PPQConfigError: when none of these works.
        """
        missing = self._missing()
        if not missing or self._unpack_system_files(missing):
            return
        if not self.download:
            raise self._not_found()
        self._download()
        if self._missing():
            raise self._not_found()

    def _transform(self) -> Any:
        steps: list[Any] = []
        if self.image_size is not None:
            steps.append(transforms.Resize((self.image_size, self.image_size)))
        mean, std = self.spec.mean, self.spec.std
        if self.channels == 3 and self.spec.channels == 1:
            steps.append(transforms.Grayscale(num_output_channels=3))
            mean, std = mean * 3, std * 3
        steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        return transforms.Compose(steps)

    def _datasets(self) -> tuple[Dataset, Dataset]:
        self.prepare_data()  # returns at once when the files are there
        transform = self._transform()
        try:
            return (
                self.spec.cls(self.root, train=True, transform=transform),
                self.spec.cls(self.root, train=False, transform=transform),
            )
        except RuntimeError as err:  # CIFAR: a file with the wrong md5
            raise PPQConfigError(
                f"dataset={self.dataset!r}: torchvision could not read the files in "
                f"{self._folder()} ({err}); delete them and pass download=True, or put "
                "intact copies there."
            ) from err
