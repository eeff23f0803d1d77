"""LightningDataModules with a ``calibration_dataloader()`` beside train/val/test."""

from ppq_lightning.datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
