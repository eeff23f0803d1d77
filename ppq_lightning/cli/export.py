"""``ppq export``: write a compressed model in a format runtimes load.

    ppq export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --format ppq --path out/ppq
    ppq export --ckpt checkpoints/epoch=0-step=4.ckpt --module my_package.my_module.MyModule \
        --module_args '{"lr": 0.01}' --format ppq --path out/mine
    ppq export --from-study outputs/study --order best --format compressed-tensors --path out/ct
    ppq export --config configs/llm/smollm2_p_then_q.yaml --format compressed-tensors --path out/ct

Sources (exactly one):

- ``--ckpt FILE``: a Lightning checkpoint (read with ``weights_only=True``), written during or
  after a fit, by ``ppq fit`` or a plain ``Trainer``. Its LightningModule class: ``--module
  package.module.ClassName`` (imported; Python finds it on ``sys.path``: an installed package or
  a folder on ``PYTHONPATH``), else the class the checkpoint names (LightningCLI's
  ``_class_path``: ``ppq fit``'s checkpoints), else this project's ``CausalLMModule`` or
  ``ImageClassifierModule``. A plain ``Trainer``'s checkpoint names no class: pass ``--module``.
  ``--module_args`` gives constructor arguments its hyperparameters lack or replace, as JSON or
  YAML (``'{"lr": 0.01}'``) or one by one (``--module_args.lr 0.01``);
- ``--from-study DIR``: the output folder of ``ppq study`` (its ``study.yaml``); ``--order``
  names the order to rebuild (``best``: the study's best order; or e.g. ``"Q>P"``), whose stages
  are applied again to the dense model (the calibrated methods are deterministic);
- ``--config FILE``: a ``ppq validate`` config; its compression callbacks run in
  ``trainer.validate`` first (``--order`` re-orders its CompressionSchedule).

``--dtype`` (compressed-tensors) and ``--overwrite`` are passed to ``ppq_lightning.export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentParser

from ppq_lightning.cli.lightning import PPQCLI
from ppq_lightning.cli.study import STUDY_CONFIG, study_parser
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import FORMATS, export
from ppq_lightning.export.checkpoint import import_module_class, load_lightning_checkpoint
from ppq_lightning.export.folder import check_target
from ppq_lightning.order.grammar import parse_order


def export_parser() -> ArgumentParser:
    """The argument parser of ``ppq export``."""
    parser = ArgumentParser(prog="ppq export", description=__doc__)
    parser.add_argument("--format", type=str, required=True, help=f"one of {list(FORMATS)}")
    parser.add_argument("--path", type=str, required=True, help="the folder to write")
    parser.add_argument("--ckpt", type=str | None, default=None, help="a Lightning checkpoint")
    parser.add_argument(
        "--module",
        type=str | None,
        default=None,
        help="with --ckpt: its LightningModule class, package.module.ClassName (default: the "
        "class the checkpoint names, or this project's modules)",
    )
    parser.add_argument(
        "--module_args",
        type=dict[str, Any] | None,
        default=None,
        help="with --ckpt: constructor arguments of the module its hyperparameters lack or "
        "replace, e.g. '{\"lr\": 0.01}' or --module_args.lr 0.01",
    )
    parser.add_argument(
        "--from-study",
        "--from_study",
        dest="from_study",
        type=str | None,
        default=None,
        help="a ppq study output folder",
    )
    parser.add_argument("--config", type=str | None, default=None, help="a ppq validate config")
    parser.add_argument("--order", type=str | None, default=None, help="'best' or e.g. 'Q>P'")
    parser.add_argument("--dtype", type=str | None, default=None, help="compressed-tensors dtype")
    parser.add_argument("--overwrite", type=bool, default=False)
    return parser


def study_order(folder: Path, order: str | None) -> str:
    """The order ``--order`` names in the study at ``folder`` (``best``: the best order of its
    study, or of the latest one when ``ppq study`` added several to the folder's report: the
    one ``study.yaml`` describes).

    Raises:
        PPQConfigError: when the study has no report, or several studies and none is the latest.
    """
    if order not in (None, "best"):
        return order
    report = folder / "report.json"
    if not report.is_file():
        raise PPQConfigError(f"--from-study {str(folder)!r} has no report.json: run ppq study.")
    studies = json.loads(report.read_text())["studies"]
    records = folder / "results.json"  # ppq study keeps earlier studies; study.yaml: the latest
    if len(studies) > 1 and records.is_file():
        data = json.loads(records.read_text())
        studies = [r for r in data["results"] if [r["key"]] == data["latest"]] or studies
    if len(studies) != 1 or not studies[0].get("best_order"):
        raise PPQConfigError(
            f"{report} holds {len(studies)} studies; name the order: --order 'P>Q'."
        )
    return studies[0]["best_order"].split("=")[0]  # a tie "A>B=B>A": the first


def model_from_study(folder: str | Path, order: str | None) -> L.LightningModule:
    """The dense model of a study with the stages of ``order`` (and the tail) applied.

    Raises:
        PPQConfigError: on a folder without ``study.yaml``, or an order of unknown stages.
    """
    folder = Path(folder)
    config = folder / STUDY_CONFIG
    if not config.is_file():
        raise PPQConfigError(
            f"--from-study {str(folder)!r} holds no {STUDY_CONFIG} (written by ppq study)."
        )
    parser = study_parser()
    init = parser.instantiate_classes(parser.parse_path(str(config)))
    stages = {stage.name: stage for stage in init.stages}
    names = parse_order(study_order(folder, order), known=stages)
    L.seed_everything(init.seed, verbose=False)
    init.data.prepare_data()
    init.data.setup("validate")
    calibration = init.data.calibration_dataloader()
    for stage in [*(stages[n] for n in names), *init.tail]:
        stage.apply(init.model, dataloader=calibration)
    return init.model


def model_from_config(config: str, order: str | None) -> L.LightningModule:
    """Run ``ppq validate --config FILE`` (its compression callbacks fire) and return the model."""
    args = ["--config", config] + (["--order", order] if order else [])
    cli = PPQCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=False)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return cli.model


def export_main(argv: list[str]) -> dict[str, Any]:
    """Parse ``ppq export`` arguments, build the model from its source, export, print sizes.

    Args:
        argv: the arguments after ``ppq export``.

    Returns:
        The manifest the export wrote (``export.json``).

    Raises:
        PPQConfigError: naming the argument and its value, before any checkpoint is read or
            stage runs: not exactly one source, an unknown ``--format``, an existing ``--path``
            without ``--overwrite``, ``--order`` with ``--ckpt``, ``--module``/``--module_args``
            without it, a ``--module`` that names no importable LightningModule class; then
            whatever reading the source or exporting refuses
            (:func:`~ppq_lightning.export.checkpoint.load_lightning_checkpoint`,
            :func:`~ppq_lightning.export.export`).
    """
    cfg = export_parser().parse_args(argv)
    sources = [s for s in ("ckpt", "from_study", "config") if cfg.get(s) is not None]
    if len(sources) != 1:
        raise PPQConfigError(
            f"ppq export needs exactly one of --ckpt, --from-study, --config (got {sources})."
        )
    options = {"overwrite": cfg.overwrite, "dtype": cfg.dtype}
    if cfg.format not in FORMATS:  # before any checkpoint is read or compression runs
        raise PPQConfigError(f"--format={cfg.format!r} is not allowed: expected {FORMATS}.")
    check_target(cfg.path, cfg.overwrite)  # likewise: an existing folder without --overwrite
    if cfg.ckpt is not None:
        if cfg.order is not None:
            raise PPQConfigError("--order applies to --from-study and --config, not --ckpt.")
        module_class = None if cfg.module is None else import_module_class(cfg.module, "--module")
        model = load_lightning_checkpoint(cfg.ckpt, module_class, **(cfg.module_args or {}))
        manifest = export(model, cfg.format, cfg.path, **options)
    else:
        for given in ("module", "module_args"):
            if cfg.get(given) is not None:
                raise PPQConfigError(
                    f"--{given} applies to --ckpt only (--from-study and --config build the "
                    "model their files describe)."
                )
        if cfg.from_study is not None:
            model = model_from_study(cfg.from_study, cfg.order)
        else:
            model = model_from_config(cfg.config, cfg.order)
        manifest = export(model, cfg.format, cfg.path, **options)
    print(
        f"wrote {cfg.path}: {manifest['bytes']} bytes ({cfg.format}); measured C "
        f"{manifest['measured_C']:.3f}"
        + (f", file C {manifest['file_C']:.3f}" if "file_C" in manifest else "")
    )
    return manifest
