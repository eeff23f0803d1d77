"""The ``ppq`` command line: LightningCLI ``fit/validate/test/predict``, ``study``, ``sweep``,
and the shared plumbing of the experiment scripts."""

from ppq_lightning.cli.main import PPQCLI, entry, main

__all__ = ["PPQCLI", "entry", "main"]
