"""Real colour photos shipped by installed packages (Debian's ``opencv-doc``, scikit-image,
scikit-learn), with a dense teacher's logits as the reference: how an ImageNet classifier's
compressed versions are compared with the dense one offline, where no labelled ImageNet image
exists (top-1 agreement and KL divergence, see ``ImageClassifierModule.evaluate``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from ppq_lightning.datamodules.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSplits,
    check_transform_from,
    eval_transform,
)
from ppq_lightning.errors import PPQConfigError, bad_value, check_choice, check_int, check_number
from ppq_lightning.models.image_classifier import ImageClassifierModule
from ppq_lightning.models.vision import SOURCES as TEACHER_SOURCES

PHOTO_SOURCES = ("opencv", "skimage", "sklearn")
OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
"""Where Debian's package ``opencv-doc`` puts the sample images of OpenCV's examples."""
OPENCV_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OPENCV_SKIPPED = {
    # colourful and detailed enough for the checks below, but no photos
    "WindowsLogo.jpg": "a rendered logo",
    "pic2.png": "coloured squares on noise (synthetic)",
    # the second view of a stereo, optical-flow or homography pair: the same scene as the
    # first, which would put one scene in both the calibration and the evaluation part
    "aloeR.jpg": "aloeL.jpg",
    "ela_modified.jpg": "ela_original.jpg",
    "graf3.png": "graf1.png",
    "leuvenB.jpg": "leuvenA.jpg",
    "right.jpg": "left.jpg",
    "rubberwhale2.png": "rubberwhale1.png",
}
"""opencv-doc files left out although they pass the colour checks: why, or the kept view."""
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",  # skimage.data.cat() is the same photo
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "stereo_motorcycle": "motorcycle_left.png",  # the left view of the stereo pair
}
"""``skimage.data`` functions of natural colour photos -> their file in ``skimage.data.data_dir``
(shipped in the wheel; a function is called only when its file is there, so nothing is
downloaded). Left out: gray images (``camera``, ``horse`` is a binary silhouette, ...),
synthetic ones (``colorwheel``, ``logo``), microscopy, astronomy and retina images
(``immunohistochemistry``, ``hubble_deep_field``, ``retina``), and those fetched from the
network (``eagle``, ``lily``, ``skin``, ...)."""
MIN_COLOUR_SPREAD = 8.0
"""The least mean per-pixel channel spread (max - min over R, G, B, of 255) of a colour photo;
gray images have 0, gray JPEGs and scans of gray paper a few units."""
MAX_FLAT_FRACTION = 0.2
"""The largest share of pixels one exact colour may cover: more is a drawing, a logo or a
diagram on a plain background, not a photo."""
MIN_PHOTOS = 4
_STATS_SIDE = 256  # the colour checks run on a nearest-neighbour thumbnail this large
_GRAY_BANDS = ({"L"}, {"I"}, {"F"}, {"1"})
_INSTALL = "`apt-get install opencv-doc` (Debian), `pip install scikit-image scikit-learn`"


class Photo(NamedTuple):
    """A named photo: ``"<source>/<name>"`` (``"opencv/apple.jpg"``,
    ``"skimage/astronaut"``, ``"sklearn/china.jpg"``) and the image, in PIL's RGB mode."""

    name: str
    image: Image.Image


def check_sources(sources: Any) -> tuple[str, ...]:
    """A non-empty list of photo sources (``opencv``, ``skimage``, ``sklearn``), as a tuple.

    Raises:
        PPQConfigError: on a string, an empty list or an unknown source (naming it).
    """
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
        raise bad_value("sources", sources, f"a non-empty list of {', '.join(PHOTO_SOURCES)}")
    for source in sources:
        check_choice("sources", source, PHOTO_SOURCES)
    return tuple(sources)


def _gray_mode(image: Image.Image) -> bool:
    return set(image.getbands()) - {"A"} in _GRAY_BANDS


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode; transparent parts over white."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return rgba.convert("RGB")
    return image.convert("RGB")


def is_colour_photo(image: Image.Image, min_size: int = 64) -> bool:
    """Whether an RGB image looks like a colour photo: both sides at least ``min_size``, a mean
    per-pixel channel spread of at least ``MIN_COLOUR_SPREAD`` (not gray or near-gray) and no
    exact colour on more than ``MAX_FLAT_FRACTION`` of the pixels (not a drawing or diagram),
    measured on a nearest-neighbour thumbnail (``_STATS_SIDE`` pixels at most a side)."""
    if min(image.size) < min_size:
        return False
    scale = min(1.0, _STATS_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.resize(size, Image.Resampling.NEAREST), dtype=np.int32)
    pixels = pixels.reshape(-1, 3)
    if float((pixels.max(axis=1) - pixels.min(axis=1)).mean()) < MIN_COLOUR_SPREAD:
        return False
    codes = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    _, counts = np.unique(codes, return_counts=True)
    return counts.max() / len(codes) <= MAX_FLAT_FRACTION


def _from_array(array: Any) -> Image.Image | None:
    """An ``(H, W, 3 or 4)`` array (uint8, or floats in [0, 1]) as an RGB image; None for
    anything else (gray, masks, stacks)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        return None
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            return None
        array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
    return _to_rgb(Image.fromarray(array))


def _opencv_photos(min_size: int) -> Iterator[Photo]:
    if not os.path.isdir(OPENCV_DATA):
        return
    for folder, subfolders, files in os.walk(OPENCV_DATA):
        subfolders.sort()
        for file in sorted(files):
            path = os.path.join(folder, file)
            name = os.path.relpath(path, OPENCV_DATA).replace(os.sep, "/")
            if not file.lower().endswith(OPENCV_EXTENSIONS) or name in OPENCV_SKIPPED:
                continue
            try:
                with Image.open(path) as image:  # the header only: mode and size
                    if _gray_mode(image) or min(image.size) < min_size:
                        continue
                    rgb = _to_rgb(image)
            except (UnidentifiedImageError, OSError, ValueError):
                continue  # not an image PIL reads, or a truncated file
            if is_colour_photo(rgb, min_size):
                yield Photo(f"opencv/{name}", rgb)


def _skimage_photos(min_size: int) -> Iterator[Photo]:
    try:
        import skimage.data
    except ImportError:
        return
    for name, file in SKIMAGE_PHOTOS.items():
        if not os.path.isfile(os.path.join(skimage.data.data_dir, file)):
            continue  # not in this wheel: skimage would download it
        try:
            array = getattr(skimage.data, name)()
        except (AttributeError, ImportError, OSError, ValueError):
            continue
        image = _from_array(array[0] if isinstance(array, tuple) else array)
        if image is not None and is_colour_photo(image, min_size):
            yield Photo(f"skimage/{name}", image)


def _sklearn_photos(min_size: int) -> Iterator[Photo]:
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()  # china.jpg and flower.jpg, shipped in the wheel
    except (ImportError, OSError):
        return
    for path, array in zip(bunch.filenames, bunch.images, strict=True):
        image = _from_array(array)
        if image is not None and is_colour_photo(image, min_size):
            yield Photo(f"sklearn/{os.path.basename(path)}", image)


_READERS = {"opencv": _opencv_photos, "skimage": _skimage_photos, "sklearn": _sklearn_photos}


def photo_files(sources: Sequence[str] = PHOTO_SOURCES, min_size: int = 64) -> list[Photo]:
    """The real colour photos available offline, sorted by name (a deterministic order).

    Sources (a missing one, package not installed or folder absent, gives no photo):

    - ``opencv``: image files under ``OPENCV_DATA`` (Debian's ``opencv-doc``), opened with PIL,
      without those of ``OPENCV_SKIPPED`` (a logo, a synthetic image, the second views of
      image pairs);
    - ``skimage``: the ``skimage.data`` photos of ``SKIMAGE_PHOTOS`` whose files ship in the
      wheel (never downloaded);
    - ``sklearn``: ``sklearn.datasets.load_sample_images()`` (china, flower).

    Every image passes :func:`is_colour_photo`: 3 colour channels (gray modes are rejected,
    transparency goes over white), real colour (mean channel spread at least
    ``MIN_COLOUR_SPREAD``), not flat (no exact colour on more than ``MAX_FLAT_FRACTION`` of the
    pixels) and both sides at least ``min_size``.

    Args:
        sources: which sources to read, of ``opencv``, ``skimage``, ``sklearn``.
        min_size: the least width and height, in pixels.

    Returns:
        :class:`Photo` ``(name, image)`` pairs: names ``"<source>/<name>"``, RGB PIL images
        (loaded, no file left open).

    Raises:
        PPQConfigError: on an unknown source (naming it) or a bad ``min_size``.
    """
    sources = check_sources(sources)
    check_int("min_size", min_size, minimum=1)
    photos = [photo for source in dict.fromkeys(sources) for photo in _READERS[source](min_size)]
    return sorted(photos, key=lambda photo: photo.name)


def _normalisation(transform: Any) -> tuple[Any, Any]:
    """The mean and std of an evaluation transform's ``Normalize`` (timm's ``Compose``,
    torchvision's ``ImageClassification``), else ImageNet's."""
    if isinstance(transform, transforms.Normalize):
        return transform.mean, transform.std
    if hasattr(transform, "mean") and hasattr(transform, "std"):
        return transform.mean, transform.std
    for step in getattr(transform, "transforms", ()):
        if isinstance(step, transforms.Normalize):
            return step.mean, step.std
    return IMAGENET_MEAN, IMAGENET_STD


def _as_tuple(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in torch.as_tensor(values).flatten())


class _CalibrationPhotos(Dataset):
    """``crops_per_photo`` samples per photo, each ``(image, label)``: its evaluation view
    (computed already), then random resized crops of the boxes drawn in advance (seeded)."""

    def __init__(
        self,
        images: list[Image.Image],
        views: Tensor,
        labels: Tensor,
        crop: Any,
        boxes: list[list[tuple[int, int, int, int]]],
        crops_per_photo: int,
    ) -> None:
        self.images, self.views, self.labels, self.crop = images, views, labels, crop
        self.size = [int(views.shape[-2]), int(views.shape[-1])]
        self.boxes, self.crops_per_photo = boxes, crops_per_photo

    def __len__(self) -> int:
        return len(self.images) * self.crops_per_photo

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        photo, k = divmod(index, self.crops_per_photo)
        if k == 0:
            return self.views[photo], self.labels[photo]
        top, left, height, width = self.boxes[photo][k - 1]
        image = self.images[photo]
        crop = TF.resized_crop(image, top, left, height, width, self.size, antialias=True)
        return self.crop(crop), self.labels[photo]


class PhotoDataModule(ImageSplits):
    """Real colour photos shipped by installed packages, labelled by a dense teacher: top-1
    agreement and KL divergence of compressed ImageNet classifiers, offline.

    The photos of :func:`photo_files` are split by a seeded permutation into a calibration part
    (``calibration_fraction`` of the photos, rounded, at least one) and an evaluation part
    (the rest): no photo is in both, and the second views of opencv's image pairs are left
    out, so no scene is either. In ``setup`` the dense teacher,
    ``ImageClassifierModule(teacher, source=teacher_source)`` in eval mode without gradients,
    on the CPU, labels every photo (its evaluation view) once; only its logits are kept. Evaluation
    (validation and test) batches are ``(images, labels, reference_logits)``: float
    ``(B, 3, H, W)``, the teacher's top-1 classes ``(B,)`` and its logits ``(B, classes)``, so
    ``ImageClassifierModule.evaluate`` reports ``acc`` as the top-1 agreement with the teacher
    and ``kl`` as ``KL(teacher || model)``. Calibration (and training) batches are
    ``(images, labels)`` of the calibration photos, labelled by the teacher too:
    ``crops_per_photo`` samples per photo, its evaluation view and ``crops_per_photo - 1``
    seeded random resized crops (``RandomResizedCrop`` of the evaluation images' size, scale
    0.35-1, then the model's normalisation). Evaluation always uses the evaluation transform.

    There are few photos: 30 on the machine this was written on (23 from opencv-doc 4.6,
    5 from scikit-image 0.26, 2 from scikit-learn 1.9), so 15 evaluate with the default
    ``calibration_fraction=0.5``: agreement is measured to within about 1/15 (one photo is
    6.7 points), enough to tell a broken compression from a good one, not to rank close ones.

    Args:
        teacher: the dense model, any ``model`` of ``ImageClassifierModule`` (built with its
            defaults: ``efficientnet-lite0`` carries Google's ImageNet weights; a timm or
            torchvision name is randomly initialised).
        teacher_source: ``auto``, ``timm`` or ``torchvision``.
        sources: the photo sources, of ``opencv``, ``skimage``, ``sklearn``.
        transform_from: the evaluation transform: None for the standard ImageNet transform
            (resize, center crop ``image_size``, ImageNet mean/std); ``"timm:<model name>"``
            or ``"torchvision:<weights enum>"`` for that model's (see ``eval_transform``).
        image_size: the crop of the standard transform (ignored with ``transform_from``,
            whose transform sets the size; the random crops take the evaluation size).
        calibration_fraction: the share of photos for calibration, in (0, 1).
        crops_per_photo: calibration samples per calibration photo (1: its evaluation view).
        batch_size: images per batch.
        num_workers: dataloader worker processes.
        seed: seed of the split, the random crops and the training shuffle.
        min_size: the least width and height of a photo, in pixels.

    Raises:
        PPQConfigError: on an invalid argument, an unknown timm model or torchvision weights;
            in ``setup``, when fewer than 4 photos are found (naming the sources and how to
            install them) or the teacher cannot be built.

    Example (YAML)::

        data:
          class_path: ppq_lightning.datamodules.PhotoDataModule
          init_args: {teacher: efficientnet-lite0, transform_from: "timm:tf_efficientnet_lite0"}
    """

    def __init__(
        self,
        teacher: str = "efficientnet-lite0",
        teacher_source: str = "auto",
        sources: Sequence[str] = PHOTO_SOURCES,
        transform_from: str | None = "timm:tf_efficientnet_lite0",
        image_size: int = 224,
        calibration_fraction: float = 0.5,
        crops_per_photo: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        min_size: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, str) or not teacher:
            raise bad_value("teacher", teacher, "a model name of ImageClassifierModule")
        check_choice("teacher_source", teacher_source, TEACHER_SOURCES)
        sources = check_sources(sources)
        check_transform_from(transform_from)
        check_int("image_size", image_size, minimum=1)
        check_number(
            "calibration_fraction", calibration_fraction, 0, 1, low_open=True, high_open=True
        )
        check_int("crops_per_photo", crops_per_photo, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("seed", seed)
        check_int("min_size", min_size, minimum=1)
        self.save_hyperparameters()
        self.teacher, self.teacher_source, self.sources = teacher, teacher_source, sources
        self.transform_from, self.image_size = transform_from, image_size
        self.calibration_fraction, self.crops_per_photo = calibration_fraction, crops_per_photo
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.min_size = min_size
        self.num_calibration_samples = 0  # known in setup
        self.max_eval_samples = None
        self.train_set: Dataset | None = None
        self.eval_set: Dataset | None = None
        self.calibration_indices: list[int] = []
        self.eval_indices: list[int] = []
        self.calibration_photos: list[str] = []
        self.eval_photos: list[str] = []

    def _where(self) -> str:
        return f"sources={list(self.sources)}"

    @torch.no_grad()
    def _teacher_logits(self, images: Tensor) -> Tensor:
        teacher = ImageClassifierModule(self.teacher, source=self.teacher_source).eval()
        logits = [teacher(chunk).float() for chunk in images.split(self.batch_size)]
        return torch.cat(logits)  # the teacher goes out of scope: only the logits stay

    def setup(self, stage: str | None = None) -> None:
        """Find the photos, split them, label them with the teacher (once; later calls do
        nothing).

        Raises:
            PPQConfigError: when fewer than 4 photos are found.
        """
        if self.eval_set is not None:
            return
        photos = photo_files(self.sources, self.min_size)
        if len(photos) < MIN_PHOTOS:
            raise PPQConfigError(
                f"PhotoDataModule found {len(photos)} photos in {self._where()} "
                f"(min_size={self.min_size}), fewer than {MIN_PHOTOS}: install them with "
                f"{_INSTALL}; opencv-doc's photos are read from {OPENCV_DATA}."
            )
        n = len(photos)
        n_calibration = min(max(round(self.calibration_fraction * n), 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        calibration = [photos[i] for i in sorted(order[:n_calibration])]
        evaluation = [photos[i] for i in sorted(order[n_calibration:])]
        plain = eval_transform(self.transform_from, self.image_size)
        views = torch.stack([plain(photo.image) for photo in calibration + evaluation])
        logits = self._teacher_logits(views)
        labels = logits.argmax(dim=1)
        self.eval_set = TensorDataset(
            views[n_calibration:], labels[n_calibration:], logits[n_calibration:]
        )
        self.train_set = self._calibration_set(
            calibration, views[:n_calibration], labels[:n_calibration], plain
        )
        self.calibration_photos = [photo.name for photo in calibration]
        self.eval_photos = [photo.name for photo in evaluation]
        self.num_calibration_samples = len(self.train_set)
        self.calibration_indices = list(range(len(self.train_set)))
        self.eval_indices = list(range(len(self.eval_set)))

    def _calibration_set(
        self, photos: list[Photo], views: Tensor, labels: Tensor, plain: Any
    ) -> Dataset:
        mean, std = _normalisation(plain)
        crop = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(_as_tuple(mean), _as_tuple(std))]
        )
        boxes: list[list[tuple[int, int, int, int]]] = []
        if self.crops_per_photo > 1:
            scale, ratio = [0.35, 1.0], [3 / 4, 4 / 3]
            with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG untouched
                torch.manual_seed(self.seed)
                for photo in photos:
                    draws = range(self.crops_per_photo - 1)
                    get = transforms.RandomResizedCrop.get_params
                    boxes.append([get(photo.image, scale, ratio) for _ in draws])
        images = [photo.image for photo in photos]
        return _CalibrationPhotos(images, views, labels, crop, boxes, self.crops_per_photo)

    def calibration_dataloader(self) -> DataLoader:
        """The calibration photos' samples (``crops_per_photo`` each), in order, as
        ``(images, labels)`` (sets up the data itself)."""
        return super().calibration_dataloader()

    def train_dataloader(self) -> DataLoader:
        """The calibration samples, shuffled (seeded), so ``fit`` trains on calibration data
        only and never sees an evaluation photo."""
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        """The evaluation photos, in name order, as ``(images, labels, reference_logits)``."""
        return super().val_dataloader()
