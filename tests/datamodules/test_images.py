import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from ppq_lightning.datamodules import ImageFolderDataModule
from ppq_lightning.errors import PPQConfigError


def _image_folder(root: Path, splits: dict[str, int], classes=("ant", "bee", "cat")) -> Path:
    """``root/<split>/<class>/<i>.jpg``: 40x30 RGB images, a different color per image."""
    for split, per_class in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                color = (40 * c + 10 * i, 60 + 5 * i, 200 - 30 * c)
                Image.new("RGB", (40, 30), color).save(folder / f"{split}{i}.jpg")
    return root


@pytest.fixture
def image_root(tmp_path):
    return _image_folder(tmp_path / "images", {"train": 4, "val": 3})


def _folder_data(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 32, "batch_size": 4, "num_calibration_samples": 5, **kwargs}
    return ImageFolderDataModule(str(root), **kwargs)


def _paths(loader) -> list[str]:
    subset = loader.dataset
    return [subset.dataset.samples[i][0] for i in subset.indices]


def test_image_folder_batches_and_splits(image_root):
    data = _folder_data(image_root)
    assert data.train_set is None  # nothing is read before setup
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1, 2}
    assert len(data.eval_set) == 9 and len(data.train_set) == 12
    evaluated = _paths(data.val_dataloader())
    assert evaluated == [path for path, _ in data.eval_set.samples]  # all, in file order
    assert _paths(data.test_dataloader()) == evaluated
    calibration = _paths(data.calibration_dataloader())
    assert len(calibration) == len(set(calibration)) == 5
    train_files = {path for path, _ in data.train_set.samples}
    assert set(calibration) <= train_files and not set(calibration) & set(evaluated)
    assert all(f"{os.sep}train{os.sep}" in path for path in calibration)
    assert [b[0].shape[0] for b in data.calibration_dataloader()] == [4, 1]
    trained = torch.cat([labels for _, labels in data.train_dataloader()])
    assert sorted(trained.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # the standard transform: resize to int(32 / 0.875) = 36, center crop 32
    assert data.eval_set.transform.transforms[0].size == 36


def test_image_folder_seeded_draws_and_max_eval_samples(image_root):
    a = _folder_data(image_root, max_eval_samples=4, seed=3)
    b = _folder_data(image_root, max_eval_samples=4, seed=3)
    c = _folder_data(image_root, max_eval_samples=4, seed=4)
    for loader in ("calibration_dataloader", "val_dataloader"):
        paths = [_paths(getattr(data, loader)()) for data in (a, b, c)]
        assert paths[0] == paths[1] and paths[0] != paths[2]
    assert len(a.eval_indices) == 4 and len(set(a.eval_indices)) == 4
    assert [len(x) for x, _ in a.val_dataloader()] == [4]
    a.setup("validate")  # a second setup keeps everything
    assert _paths(a.val_dataloader()) == _paths(b.val_dataloader())
    everything = _folder_data(image_root, max_eval_samples=50)
    everything.setup()
    assert everything.eval_indices == list(range(9))
    order = [torch.cat([y for _, y in data.train_dataloader()]) for data in (a, b, c)]
    assert torch.equal(order[0], order[1])


@pytest.mark.parametrize(
    "transform_from", ["timm:resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V1"]
)
def test_image_folder_model_transforms_need_no_download(
    image_root, transform_from, no_network, monkeypatch, tmp_path
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    data = _folder_data(image_root, transform_from=transform_from, batch_size=2)
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.long
    assert not (tmp_path / "torch_home").exists()  # no weights were fetched


def test_torchvision_default_weights_transform(image_root):
    data = _folder_data(image_root, transform_from="torchvision:ResNet18_Weights.DEFAULT")
    data.setup()
    assert data.eval_set[0][0].shape == (3, 224, 224)


def test_image_folder_missing_folders(tmp_path, image_root):
    with pytest.raises(PPQConfigError, match=r"root='.*nowhere' is not allowed"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(PPQConfigError, match="val_dir='validation'"):
        ImageFolderDataModule(str(image_root), val_dir="validation")
    with pytest.raises(PPQConfigError, match="train_dir='training'"):
        ImageFolderDataModule(str(image_root), train_dir="training")


def test_image_folder_without_classes_or_images(tmp_path):
    root = _image_folder(tmp_path / "a", {"train": 2})
    (root / "val").mkdir()
    data = _folder_data(root, num_calibration_samples=2)
    with pytest.raises(PPQConfigError, match=r"val_dir: the folder .*val has no class"):
        data.setup()
    (root / "val" / "ant").mkdir()
    (root / "val" / "ant" / "notes.txt").write_text("not an image")
    with pytest.raises(PPQConfigError, match=r"class folder .*val.ant has no images"):
        data.setup()
    root = _image_folder(tmp_path / "b", {"train": 2, "val": 1}, classes=("ant", "bee"))
    (root / "val" / "bee").rename(root / "val" / "cow")
    with pytest.raises(PPQConfigError, match=r"different class folders.*\['bee'\].*\['cow'\]"):
        _folder_data(root, num_calibration_samples=2).setup()
    (root / "val" / "cow").rename(root / "val" / "bee")
    with pytest.raises(PPQConfigError, match=r"num_calibration_samples=5 .* at most the 4 train"):
        _folder_data(tmp_path / "b", num_calibration_samples=5).setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transform_from": "timm:no_such_model"}, "transform_from='timm:no_such_model'"),
        ({"transform_from": "timm:resnet18.no_tag"}, "transform_from='timm:resnet18.no_tag'"),
        ({"transform_from": "torchvision:No_Weights.X"}, "transform_from='torchvision:No_"),
        ({"transform_from": "torchvision:ResNet18_Weights.NOPE"}, "ResNet18_Weights.NOPE'"),
        ({"transform_from": "resnet18"}, "transform_from='resnet18'.*'timm:<model name>'"),
        ({"batch_size": True}, "batch_size=True"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 2.0}, "batch_size=2.0"),
        ({"num_calibration_samples": 0}, "num_calibration_samples=0"),
        ({"num_calibration_samples": "8"}, "num_calibration_samples='8'"),
        ({"image_size": 0}, "image_size=0"),
        ({"image_size": 224.0}, "image_size=224.0"),
        ({"image_size": None}, "image_size=None"),
        ({"max_eval_samples": 0}, "max_eval_samples=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"root": None}, "root=None"),
    ],
)
def test_image_folder_bad_arguments(image_root, kwargs, match):
    kwargs = {"root": str(image_root), **kwargs}
    with pytest.raises(PPQConfigError, match=match):
        ImageFolderDataModule(**kwargs)
