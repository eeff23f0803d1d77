import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppq_lightning.datamodules import PhotoDataModule, photo_files
from ppq_lightning.datamodules import photos as photos_module
from ppq_lightning.datamodules.images import IMAGENET_MEAN, eval_transform
from ppq_lightning.datamodules.photos import MIN_COLOUR_SPREAD, OPENCV_DATA, _normalisation
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule

# skipped where they are absent, failed under CI=true (tests/conftest.py)
needs_opencv = pytest.mark.usefixtures("debian_opencv_doc")
needs_all_sources = pytest.mark.usefixtures("all_photo_sources")  # at least 4 photos
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
# small images keep the teacher cheap on CPU: the standard transform honours image_size
FAST = {"transform_from": None, "image_size": 96, "batch_size": 8}


def _spread(image: Image.Image) -> float:
    pixels = np.asarray(image, dtype=np.int32)
    return float((pixels.max(axis=-1) - pixels.min(axis=-1)).mean())


@pytest.fixture(scope="module")
def photos():
    return photo_files()


@pytest.fixture(scope="module")
def data():
    module = PhotoDataModule(**FAST)
    module.setup("validate")
    return module


@pytest.fixture(scope="module")
def dense():
    return ImageClassifierModule("efficientnet-lite0")


def test_photo_files_are_colour_photos(photos):
    assert len(photos) >= 4
    names = [photo.name for photo in photos]
    assert names == sorted(names) and len(set(names)) == len(names)
    for name, image in photos:
        assert name.split("/")[0] in ("opencv", "skimage", "sklearn")
        assert image.mode == "RGB" and len(image.getbands()) == 3
        assert min(image.size) >= 64
        assert _spread(image) >= MIN_COLOUR_SPREAD / 2, name  # not gray (the check: a thumbnail)
    if HAS_SKIMAGE:
        assert {"skimage/astronaut", "skimage/chelsea", "skimage/coffee"} <= set(names)
    if HAS_SKLEARN:
        assert {"sklearn/china.jpg", "sklearn/flower.jpg"} <= set(names)


@needs_opencv
def test_photo_files_reject_gray_flat_and_paired_opencv_images(photos):
    names = {photo.name for photo in photos}
    assert any(name.startswith("opencv/") for name in names)
    rejected = {
        "left01.jpg": "a gray chessboard (mode L)",
        "Blender_Suzanne1.jpg": "RGB with three equal channels",
        "sudoku.png": "a near-gray scan",
        "pic1.png": "shapes on a plain background",
        "opencv-logo.png": "a logo",
        "rubberwhale2.png": "the second view of a pair",
    }
    for file in rejected:
        if Path(OPENCV_DATA, file).is_file():
            assert f"opencv/{file}" not in names, rejected[file]
    for file in ("baboon.jpg", "fruits.jpg", "rubberwhale1.png"):
        if Path(OPENCV_DATA, file).is_file():
            assert f"opencv/{file}" in names


def test_photo_files_deterministic_per_source_and_min_size(photos, no_network):
    names = [photo.name for photo in photos]
    again = [photo.name for photo in photo_files(("sklearn", "skimage", "opencv"))]
    assert again == names  # sorted by name, whatever the order of the sources
    if HAS_SKLEARN:
        assert [p.name for p in photo_files(("sklearn",))] == [
            "sklearn/china.jpg",
            "sklearn/flower.jpg",
        ]
    large = photo_files(("skimage", "sklearn"), min_size=450)
    assert all(min(photo.image.size) >= 450 for photo in large)
    assert {photo.name for photo in large} < set(names)


def _noise(rng, size, channels=3):
    return rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)


def test_photo_files_filters_a_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    Image.fromarray(_noise(rng, (80, 70))).save(tmp_path / "colour.png")
    Image.fromarray(_noise(rng, (80, 70), 1)[..., 0]).save(tmp_path / "gray.png")  # mode L
    gray = _noise(rng, (80, 70), 1).repeat(3, axis=-1)
    Image.fromarray(gray).save(tmp_path / "gray_rgb.png")  # RGB, no colour
    near_gray = np.clip(gray.astype(int) + rng.integers(0, 3, gray.shape), 0, 255)
    Image.fromarray(near_gray.astype(np.uint8)).save(tmp_path / "near_gray.png")
    Image.fromarray(_noise(rng, (40, 90))).save(tmp_path / "narrow.png")  # a side < 64
    flat = _noise(rng, (80, 80))
    flat[:, :50] = (0, 90, 200)  # a plain background: a diagram
    Image.fromarray(flat).save(tmp_path / "diagram.png")
    rgba = _noise(rng, (80, 80), 4)
    rgba[..., 3] = 255
    rgba[:4, :4, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_noise(rng, (64, 64))).save(tmp_path / "sub" / "nested.jpg", quality=95)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("no image")
    monkeypatch.setattr(photos_module, "OPENCV_DATA", str(tmp_path))
    found = photo_files(("opencv",))
    assert [p.name for p in found] == [
        "opencv/colour.png",
        "opencv/sub/nested.jpg",
        "opencv/transparent.png",
    ]
    assert all(p.image.mode == "RGB" for p in found)
    assert found[2].image.getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    small = [p.name for p in photo_files(("opencv",), min_size=32)]
    assert "opencv/narrow.png" in small
    monkeypatch.setattr(photos_module, "OPENCV_DATA", str(tmp_path / "absent"))
    assert photo_files(("opencv",)) == []  # a missing source gives no photo


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"sources": ("opencv", "flickr")}, "sources='flickr'"),
        ({"sources": "opencv"}, "sources='opencv'"),
        ({"sources": ()}, "sources=()"),
        ({"min_size": 0}, "min_size=0"),
    ],
)
def test_photo_files_bad_arguments(kwargs, argument):
    with pytest.raises(PPQConfigError, match=argument.replace("(", r"\(").replace(")", r"\)")):
        photo_files(**kwargs)


@needs_all_sources
def test_split_is_disjoint_and_covers_every_photo(data, photos):
    calibration, evaluation = data.calibration_photos, data.eval_photos
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == [photo.name for photo in photos]
    assert len(calibration) == round(0.5 * len(photos))
    assert len(data.train_set) == len(calibration) and len(data.eval_set) == len(evaluation)
    images, labels = next(iter(data.calibration_dataloader()))
    assert images.shape[1:] == (3, 96, 96) and labels.dtype == torch.long
    trained = torch.cat([batch[1] for batch in data.train_dataloader()])
    assert len(trained) == len(calibration)  # fit sees calibration photos only
    assert data.hparams.calibration_fraction == 0.5 and data.hparams.image_size == 96


@needs_all_sources
def test_evaluation_batches_carry_the_teacher(data):
    for loader in (data.val_dataloader(), data.test_dataloader()):
        batches = list(loader)
        assert sum(len(batch[0]) for batch in batches) == len(data.eval_photos)
        for batch in batches:
            assert len(batch) == 3
            images, labels, logits = batch
            assert images.shape[1:] == (3, 96, 96) and logits.shape == (len(images), 1000)
            assert torch.equal(labels, logits.argmax(dim=1))


@needs_all_sources
def test_dense_teacher_agrees_with_itself(data, dense):
    metrics = dense.evaluate(data.val_dataloader())
    assert metrics["acc"] == 1.0
    assert abs(metrics["kl"]) < 1e-4


@needs_all_sources
def test_perturbed_model_moves_away(data, dense):
    perturbed = copy.deepcopy(dense)
    weight = perturbed.model.conv_stem.weight
    with torch.no_grad():
        weight.add_(0.1 * weight.std() * torch.randn(weight.shape, generator=torch.Generator()))
    metrics = perturbed.evaluate(data.val_dataloader())
    assert metrics["kl"] > 1e-6 and 0.0 <= metrics["acc"] <= 1.0


@needs_all_sources
def test_crops_add_calibration_samples_only(data, no_network):
    crops = PhotoDataModule(**FAST, crops_per_photo=3)
    crops.setup()
    assert crops.calibration_photos == data.calibration_photos
    assert crops.eval_photos == data.eval_photos
    assert len(crops.train_set) == 3 * len(data.train_set)
    assert torch.equal(crops.eval_set.tensors[0], data.eval_set.tensors[0])
    assert torch.equal(crops.eval_set.tensors[2], data.eval_set.tensors[2])
    plain, label = data.train_set[1]
    first, crop, other = (crops.train_set[3 + k] for k in range(3))
    assert torch.equal(first[0], plain) and first[1] == crop[1] == other[1] == label
    assert crop[0].shape == plain.shape and not torch.equal(crop[0], plain)
    assert not torch.equal(crop[0], other[0])
    assert torch.equal(crops.train_set[4][0], crop[0])  # the boxes are drawn once, seeded
    samples = sum(len(batch[0]) for batch in crops.calibration_dataloader())
    assert samples == 3 * len(crops.calibration_photos)


def test_normalisation_of_the_evaluation_transforms():
    mean, _ = _normalisation(eval_transform("timm:tf_efficientnet_lite0"))
    assert torch.allclose(torch.as_tensor(mean, dtype=torch.float32), torch.full((3,), 0.5))
    mean, _ = _normalisation(eval_transform(None, 96))
    assert tuple(mean) == IMAGENET_MEAN


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"calibration_fraction": 0}, "calibration_fraction=0"),
        ({"calibration_fraction": 1}, "calibration_fraction=1"),
        ({"crops_per_photo": 0}, "crops_per_photo=0"),
        ({"batch_size": True}, "batch_size=True"),
        ({"sources": ("opencv", "imagenet")}, "sources='imagenet'"),
        ({"teacher_source": "keras"}, "teacher_source='keras'"),
        ({"teacher": ""}, "teacher=''"),
        ({"transform_from": "timm:no_such_model"}, "transform_from='timm:no_such_model'"),
        ({"min_size": 0}, "min_size=0"),
    ],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(PPQConfigError, match=argument):
        PhotoDataModule(**kwargs)


def test_fewer_than_four_photos(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(photos_module, "OPENCV_DATA", str(tmp_path))  # no photo there
    data = PhotoDataModule(sources=("opencv",), **FAST)
    with pytest.raises(PPQConfigError, match="fewer than 4") as error:
        data.setup()
    assert "apt-get install opencv-doc" in str(error.value)
    assert "pip install scikit-image scikit-learn" in str(error.value)
    assert "sources=['opencv']" in str(error.value)
    monkeypatch.setattr(photos_module, "photo_files", lambda *args, **kwargs: [])
    with pytest.raises(PPQConfigError, match=r"found 0 photos in sources=\['sklearn'\]"):
        PhotoDataModule(sources=("sklearn",), **FAST).setup()
