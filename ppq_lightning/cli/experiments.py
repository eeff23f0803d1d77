"""Shared plumbing of the paper-experiment scripts (``scripts/order_grid.py`` and friends):
model and data from YAML, method factories by short name, and the report's front matter."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from ppq_lightning.callbacks import (
    GPTQ,
    BatchNormRecalibration,
    BlockRemoval,
    CompressionCallback,
    DepGraphPruning,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.errors import check_choice
from ppq_lightning.reports import write_text_atomic

DEFAULT_CONFIG = Path(__file__).parents[2] / "configs" / "experiments" / "smollm2.yaml"

PRUNERS: dict[str, Callable[..., CompressionCallback]] = {
    "magnitude": lambda sparsity, n, **common: MagnitudePruning(sparsity=sparsity, **common),
    "wanda": lambda sparsity, n, **common: Wanda(
        sparsity=sparsity, num_calibration_batches=n, **common
    ),
    "wanda_layer": lambda sparsity, n, **common: Wanda(
        sparsity=sparsity, scope="layer", num_calibration_batches=n, **common
    ),
    "sparsegpt": lambda sparsity, n, **common: SparseGPT(
        sparsity=sparsity, num_calibration_batches=n, **common
    ),
    "block_removal": lambda sparsity, n, **common: BlockRemoval(
        ratio=sparsity, num_calibration_batches=n, **common
    ),
    "depgraph": lambda sparsity, n, **common: DepGraphPruning(ratio=sparsity, **common),
}
"""Pruning method by short name -> ``(sparsity, calibration batches, name=, log_layers=,
b_orig=)``; for ``block_removal`` the sparsity is the ratio of blocks, for ``depgraph`` (CNN and
ViT channels through Torch-Pruning) the ratio of channels."""
QUANTIZERS: dict[str, Callable[..., CompressionCallback]] = {
    "rtn": lambda bits, n, **common: RTNQuantization(bits=bits, **common),
    "gptq": lambda bits, n, **common: GPTQ(bits=bits, num_calibration_batches=n, **common),
}
"""Quantization method by short name -> ``(bits, calibration batches, name=, ...)``."""


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


def pruner(
    method: str, sparsity: float, name: str, calibration: int, b_orig: int = 16
) -> CompressionCallback:
    """A pruning stage by short name; for ``block_removal`` ``sparsity`` is the block ratio.

    Raises:
        PPQConfigError: on an unknown method.
    """
    make = PRUNERS[check_choice("pruning", method, PRUNERS)]
    return make(sparsity, calibration, name=name, log_layers=False, b_orig=b_orig)


def recalibration(calibration: int, name: str = "B", b_orig: int = 16) -> CompressionCallback:
    """The BatchNorm recalibration stage the vision experiments append to every cell."""
    return BatchNormRecalibration(
        num_calibration_batches=calibration, name=name, log_layers=False, b_orig=b_orig
    )


def quantizer(
    method: str, bits: int, name: str, calibration: int, group_size: int | None = None, **extra: Any
) -> CompressionCallback:
    """A quantization stage by short name (per channel unless ``group_size``).

    Raises:
        PPQConfigError: on an unknown method.
    """
    make = QUANTIZERS[check_choice("quantization", method, QUANTIZERS)]
    return make(bits, calibration, name=name, log_layers=False, group_size=group_size, **extra)


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The command that is running, for the report (``python scripts/x.py --a b``): the
    process's own, or ``script`` with ``argv`` when a script's ``main(argv)`` is called."""
    words = sys.argv if argv is None else [script or sys.argv[0], *argv]
    return "python " + " ".join(shlex.quote(a) for a in words)


def write_results_readme(folder: str | Path, title: str, command: str, *blocks: str) -> Path:
    """Write an experiment's ``README.md``: the title, the command that produced it, then the
    paragraphs and tables, one blank line apart.

    Args:
        folder: the report folder (created if needed).
        title: the heading, without the ``#``.
        command: the command line (:func:`command_line`), indented as a code block.
        blocks: paragraphs and Markdown tables, in order; empty ones (e.g. the table of no rows)
            are left out, trailing newlines dropped.

    Returns:
        The path of the written ``README.md``.
    """
    parts = [f"# {title}", "Produced by:", f"    {command}"]
    parts += [block.rstrip("\n") for block in blocks if block.strip()]
    return write_text_atomic(Path(folder) / "README.md", "\n\n".join(parts) + "\n")
