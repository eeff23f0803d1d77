"""Shared plumbing of the paper-experiment scripts (``scripts/order_grid.py`` and friends):
model and data from YAML, method factories by short name, and the report's front matter."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from ppq_lightning.callbacks import CompressionCallback
from ppq_lightning.callbacks.registry import build_stage, method_names
from ppq_lightning.reports import write_text_atomic

DEFAULT_CONFIG = Path(__file__).parents[2] / "configs" / "experiments" / "smollm2.yaml"
PRUNING_HELP = (
    f"a pruning method of the registry ({', '.join(method_names('P'))}), or a spec with "
    "arguments, e.g. 'wanda,scope=layer'"
)
QUANTIZATION_HELP = (
    f"a quantization method of the registry ({', '.join(method_names('Q'))}), or a spec with "
    "arguments, e.g. 'gptq,act_order=true'"
)


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
    method: str, sparsity: float, name: str, calibration: int, b_orig: int = 16, **extra: Any
) -> CompressionCallback:
    """A pruning stage from the method registry (``ppq_lightning.callbacks.registry``) at
    ``sparsity``: ``magnitude``, ``wanda``, ``sparsegpt``, ``block_removal`` (the ratio of
    blocks), ``channels`` (MLP channels), ``depgraph`` (CNN/ViT channel groups), or a spec with
    arguments such as ``wanda,scope=layer``.

    Raises:
        PPQConfigError: on a method that is not a registered pruning method.
    """
    return build_stage(
        method,
        sparsity,
        letters="P",
        argument="pruning",
        num_calibration_batches=calibration,
        name=name,
        log_layers=False,
        b_orig=b_orig,
        **extra,
    )


def recalibration(calibration: int, name: str = "B", b_orig: int = 16) -> CompressionCallback:
    """The BatchNorm recalibration stage the vision experiments append to every cell."""
    return build_stage(
        "bn", num_calibration_batches=calibration, name=name, log_layers=False, b_orig=b_orig
    )


def quantizer(
    method: str, bits: int, name: str, calibration: int, group_size: int | None = None, **extra: Any
) -> CompressionCallback:
    """A quantization stage from the method registry at ``bits`` (per channel unless
    ``group_size``): ``rtn``, ``gptq``, or a spec with arguments (``gptq,act_order=true``).

    Raises:
        PPQConfigError: on a method that is not a registered quantization method.
    """
    return build_stage(
        method,
        bits,
        letters="Q",
        argument="quantization",
        num_calibration_batches=calibration,
        name=name,
        log_layers=False,
        group_size=group_size,
        **extra,
    )


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The command that is running, for the report (``python scripts/x.py --a b``): the
    process's own, or ``script`` with ``argv`` when a script's ``main(argv)`` is called."""
    words = sys.argv if argv is None else [script or sys.argv[0], *argv]
    return "python " + " ".join(shlex.quote(a) for a in words)


def source_commit() -> str:
    """``git rev-parse HEAD`` of the repository this code runs from, with ``-dirty`` when its
    tracked files differ from that commit (the figures then came from uncommitted code), or
    ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def provenance(command: str) -> dict[str, str]:
    """What a results file records of the run that wrote it: ``command`` and ``commit``
    (:func:`source_commit`), e.g. ``summary.update(provenance(command_line(argv)))``."""
    return {"command": command, "commit": source_commit()}


def write_results_readme(folder: str | Path, title: str, command: str, *blocks: str) -> Path:
    """Write an experiment's ``README.md``: the title, the command that produced it, then the
    paragraphs and tables, one blank line apart.

    Args:
        folder: the report folder (created if needed).
        title: the heading, without the ``#``.
        command: the command line (:func:`command_line`), indented as a code block after the
            commit it ran at (:func:`source_commit`).
        blocks: paragraphs and Markdown tables, in order; empty ones (e.g. the table of no rows)
            are left out, trailing newlines dropped.

    Returns:
        The path of the written ``README.md``.
    """
    parts = [f"# {title}", f"Produced at commit `{source_commit()}` by:", f"    {command}"]
    parts += [block.rstrip("\n") for block in blocks if block.strip()]
    return write_text_atomic(Path(folder) / "README.md", "\n\n".join(parts) + "\n")
