"""LightningDataModules with a ``calibration_dataloader()`` beside train/val/test."""

from ppq_lightning.datamodules.images import ImageFolderDataModule
from ppq_lightning.datamodules.photos import PhotoDataModule, photo_files
from ppq_lightning.datamodules.text import TextDataModule
from ppq_lightning.datamodules.vision_datasets import VisionDataModule

__all__ = [
    "ImageFolderDataModule",
    "PhotoDataModule",
    "TextDataModule",
    "VisionDataModule",
    "photo_files",
]
