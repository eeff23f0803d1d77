import gzip
import os
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import datasets

from ppq_lightning.datamodules import VisionDataModule
from ppq_lightning.errors import PPQConfigError

# skipped where it is absent, failed under CI=true (tests/conftest.py)
needs_debian_files = pytest.mark.usefixtures("debian_fashion_mnist")
RAW_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _idx(path: Path, data: bytes, dims: tuple[int, ...]) -> None:
    """A gzipped IDX file of unsigned bytes (the MNIST format)."""
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as out:
        out.write(header + data)


def test_fashion_mnist_unpacked_from_a_system_folder(tmp_path, no_network):
    system = tmp_path / "system"
    system.mkdir()
    for split, n in (("train", 6), ("t10k", 3)):
        pixels = bytes((7 * i) % 256 for i in range(n * 28 * 28))
        _idx(system / f"{split}-images-idx3-ubyte.gz", pixels, (n, 28, 28))
        _idx(system / f"{split}-labels-idx1-ubyte.gz", bytes(range(n)), (n,))
    data = VisionDataModule(
        root=str(tmp_path / "root"), system_dir=str(system), num_calibration_samples=4
    )
    data.setup()
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(RAW_NAMES)  # no temporary file left
    assert len(data.train_set) == 6 and len(data.eval_set) == 3
    assert data.eval_set.targets.tolist() == [0, 1, 2]
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (3, 1, 28, 28) and labels.tolist() == [0, 1, 2]
    assert sorted(data.calibration_indices) != [] and len(data.calibration_indices) == 4


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fashion")  # not the session's: this unpacks it itself


@pytest.fixture(scope="module")
def fashion(fashion_root):
    data = _fashion(fashion_root, batch_size=128)
    data.setup("validate")
    return data


def _fashion(root: Path, **kwargs) -> VisionDataModule:
    kwargs = {"num_calibration_samples": 64, "max_eval_samples": 100, "batch_size": 100, **kwargs}
    return VisionDataModule(root=str(root), **kwargs)


@needs_debian_files
def test_fashion_mnist_from_debian_files(fashion, fashion_root, tmp_path):
    raw = fashion_root / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(RAW_NAMES)
    stats = {name: (raw / name).stat() for name in RAW_NAMES}
    assert stats["train-images-idx3-ubyte"].st_size == 60000 * 28 * 28 + 16
    # a second datamodule reuses the unpacked files (and needs no system folder)
    again = _fashion(fashion_root, system_dir=str(tmp_path / "nothing"))
    again.setup()
    for name in RAW_NAMES:
        after = (raw / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (stats[name].st_ino, stats[name].st_mtime_ns)
    assert isinstance(fashion.train_set, datasets.FashionMNIST)
    assert len(fashion.train_set) == 60000 and fashion.train_set.train
    assert len(fashion.eval_set) == 10000 and not fashion.eval_set.train
    calibration = fashion.calibration_dataloader().dataset
    evaluation = fashion.val_dataloader().dataset
    assert calibration.dataset is fashion.train_set and evaluation.dataset is fashion.eval_set
    assert len(calibration) == 64 and len(set(calibration.indices)) == 64
    assert len(evaluation) == 100 and len(set(evaluation.indices)) == 100


@needs_debian_files
def test_fashion_mnist_batches(fashion):
    images, labels = next(iter(fashion.val_dataloader()))
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() <= 9
    assert abs(images.mean().item()) < 0.2 and 0.8 < images.std().item() < 1.2
    calibration = torch.cat([x for x, _ in fashion.calibration_dataloader()])
    assert calibration.shape == (64, 1, 28, 28)
    x, y = next(iter(fashion.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and y.shape == (128,)


@needs_debian_files
def test_fashion_mnist_channels_and_size(fashion_root):
    rgb = _fashion(fashion_root, channels=3)
    rgb.setup()
    image = rgb.eval_set[0][0]
    assert image.shape == (3, 28, 28)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    resized = _fashion(fashion_root, image_size=32, channels=1)
    resized.setup()
    assert resized.eval_set[0][0].shape == (1, 32, 32)


@needs_debian_files
def test_fashion_mnist_seeded(fashion, fashion_root):
    same, other = _fashion(fashion_root), _fashion(fashion_root, seed=1)
    same.setup()
    other.setup()
    assert same.calibration_indices == fashion.calibration_indices
    assert same.eval_indices == fashion.eval_indices
    assert other.calibration_indices != fashion.calibration_indices
    assert other.eval_indices != fashion.eval_indices
    first = next(iter(same.calibration_dataloader()))[0]
    assert torch.equal(first, next(iter(fashion.calibration_dataloader()))[0][:64])


class _TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("val_loss", loss)
        return loss


@needs_debian_files
def test_trainer_validates_on_fashion_mnist(fashion_root):
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    data = _fashion(fashion_root, batch_size=32)
    (result,) = trainer.validate(_TinyClassifier(), datamodule=data)
    assert torch.isfinite(torch.tensor(result["val_loss"]))


def test_missing_files_say_how_to_get_them(tmp_path, no_network):
    data = VisionDataModule(root=str(tmp_path / "empty"), system_dir=str(tmp_path / "nothing"))
    with pytest.raises(PPQConfigError, match=r"download=True.*apt-get install dataset-fashion"):
        data.setup()
    with pytest.raises(PPQConfigError, match=r"dataset='fashion_mnist'.*root='.*empty'"):
        data.prepare_data()
    cifar = VisionDataModule(dataset="cifar10", root=str(tmp_path))
    with pytest.raises(PPQConfigError, match=r"dataset='cifar10'.*cifar-10-batches-py.*download"):
        cifar.setup()
    assert not (tmp_path / "empty").exists()


def test_failed_download_is_explained(tmp_path, monkeypatch, no_network):
    def fail(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets.FashionMNIST, "download", fail)
    data = VisionDataModule(root=str(tmp_path), download=True, system_dir=None)
    with pytest.raises(PPQConfigError, match=r"could not be downloaded.*needs network.*apt-get"):
        data.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "mnist"}, "dataset='mnist'.*fashion_mnist, cifar10, cifar100"),
        ({"dataset": "cifar10", "channels": 1}, "channels=1 .*1 is for fashion_mnist"),
        ({"channels": 2}, "channels=2"),
        ({"download": "yes"}, "download='yes'"),
        ({"image_size": 0}, "image_size=0"),
        ({"batch_size": True}, "batch_size=True"),
        ({"num_calibration_samples": 0}, "num_calibration_samples=0"),
        ({"max_eval_samples": 1.5}, "max_eval_samples=1.5"),
        ({"system_dir": 3}, "system_dir=3"),
    ],
)
def test_vision_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        VisionDataModule(root=str(tmp_path), **kwargs)
