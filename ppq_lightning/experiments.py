"""Shared plumbing of the paper-experiment scripts (``scripts/order_grid.py`` and friends):
model and data from YAML, method factories by short name, and the report's front matter."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.errors import PPQConfigError

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "experiments" / "smollm2.yaml"
PRUNERS = ("magnitude", "wanda", "sparsegpt", "block_removal")
QUANTIZERS = ("rtn", "gptq")


def experiment_parser(description: str) -> ArgumentParser:
    """A parser with ``--config``, ``--model``, ``--data`` (subclass arguments) and ``--output``;
    the default config is ``configs/experiments/smollm2.yaml`` when it exists."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(L.LightningModule, "model")
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    parser.add_argument("--output", type=str, required=True, help="report folder")
    parser.add_argument("--num_calibration_batches", type=int, default=16)
    if DEFAULT_CONFIG.exists():
        parser.default_config_files = [str(DEFAULT_CONFIG)]
    return parser


def instantiate(parser: ArgumentParser, argv: list[str] | None = None) -> Any:
    cfg = parser.parse_args(argv)
    return (
        parser.instantiate(cfg)
        if hasattr(parser, "instantiate")
        else parser.instantiate_classes(cfg)
    )


def pruner(method: str, sparsity: float, name: str, calibration: int) -> CompressionCallback:
    """A pruning stage by short name; for ``block_removal`` ``sparsity`` is the block ratio.

    Raises:
        PPQConfigError: on an unknown method.
    """
    from ppq_lightning import callbacks

    common = {"name": name, "log_layers": False}
    if method == "magnitude":
        return callbacks.MagnitudePruning(sparsity=sparsity, **common)
    if method == "wanda":
        return callbacks.Wanda(sparsity=sparsity, num_calibration_batches=calibration, **common)
    if method == "sparsegpt":
        return callbacks.SparseGPT(sparsity=sparsity, num_calibration_batches=calibration, **common)
    if method == "block_removal":
        return callbacks.BlockRemoval(
            ratio=sparsity, num_calibration_batches=calibration, name=name
        )
    raise PPQConfigError(f"pruning={method!r} is not allowed: expected one of {PRUNERS}.")


def quantizer(
    method: str, bits: int, name: str, calibration: int, group_size: int | None = None, **extra: Any
) -> CompressionCallback:
    """A quantization stage by short name (per channel unless ``group_size``).

    Raises:
        PPQConfigError: on an unknown method.
    """
    from ppq_lightning import callbacks

    common = {"name": name, "log_layers": False, "group_size": group_size, **extra}
    if method == "rtn":
        return callbacks.RTNQuantization(bits=bits, **common)
    if method == "gptq":
        return callbacks.GPTQ(bits=bits, num_calibration_batches=calibration, **common)
    raise PPQConfigError(f"quantization={method!r} is not allowed: expected one of {QUANTIZERS}.")


def command_line() -> str:
    """The command that is running, for the report (``python scripts/x.py --a b``)."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)
