"""LightningDataModules with a ``calibration_dataloader()`` beside train/val/test."""

from ppq_lightning.datamodules.images import ImageFolderDataModule
from ppq_lightning.datamodules.text import TextDataModule
from ppq_lightning.datamodules.vision_datasets import VisionDataModule

__all__ = ["ImageFolderDataModule", "TextDataModule", "VisionDataModule"]
