"""ppq study: run an order study (ppq_lightning.study.OrderStudy) from YAML and the command
line, print its cells and its best order, and write its report to --output_dir.

    ppq study --config configs/study/smollm2_order.yaml
    ppq study --config configs/tiny/study.yaml --search pih --output_dir outputs/tiny_study
    ppq study --config configs/tiny/study.yaml --order "Q>P" --P.sparsity 0.6 --Q.bits 3
    ppq study --config configs/tiny/study.yaml --search predict --predictor interference

Besides the study's own arguments, --<Stage>.<argument> VALUE (or =VALUE) sets an argument of
the stage named <Stage> in `stages` (the value is read as YAML), and --<Stage>.class_path NAME
swaps its method (Wanda, a short name of the method registry, or a full class path; the
arguments the new method shares with the old one are kept). That is how sweep points vary
intensities and methods without repeating the stage list: a W&B sweep parameter P.sparsity
arrives as --P.sparsity=0.5.

The report (studies.csv/.md, cells.csv, report.json, plots) holds every study run with this
--output_dir: a study is one row, keyed by its stages' identities, search and data, so running
the same study again replaces its row and another study adds one. study.yaml is the last
study's configuration (what ppq export --from-study rebuilds).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from rich import box
from rich.console import Console
from rich.table import Table

from ppq_lightning import callbacks
from ppq_lightning.callbacks import CompressionCallback, RTNQuantization
from ppq_lightning.callbacks.registry import METHODS, callback_parameters, callback_signature
from ppq_lightning.callbacks.rtn_quantization import CURVE_BITS
from ppq_lightning.cli.class_paths import check_class_path
from ppq_lightning.cli.lightning import instantiate_clearly
from ppq_lightning.cli.outcome import note_progress
from ppq_lightning.errors import (
    PPQConfigError,
    bad_value,
    check_choice,
    check_folder,
    check_int,
)
from ppq_lightning.loggers import agent_run_id
from ppq_lightning.ops.quant_grid import MAX_BITS, MIN_BITS
from ppq_lightning.order.prediction import PREDICTORS
from ppq_lightning.reports import write_text_atomic
from ppq_lightning.study import SEARCH_MODES, OrderStudy, StudyResult, log_result, write_report
from ppq_lightning.study.report import read_results
from ppq_lightning.yaml_numbers import load_yaml

OVERRIDE = re.compile(r"--([A-Za-z][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$", re.S)
TOP_LEVEL = {"model", "data", "logger", "config"}
STUDY_CONFIG = "study.yaml"


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's lines and example commands kept as written."""


def study_parser() -> ArgumentParser:
    """The argument parser of ``ppq study``."""
    parser = ArgumentParser(prog="ppq study", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these arguments")
    parser.add_subclass_arguments(L.LightningModule, "model", help="the dense model")
    parser.add_subclass_arguments(L.LightningDataModule, "data", help="evaluation/calibration data")
    parser.add_argument("--stages", type=list[CompressionCallback], help="named stages")
    parser.add_argument(
        "--tail",
        type=list[CompressionCallback],
        default=[],
        help="stages after every cell's order (e.g. BatchNormRecalibration)",
    )
    parser.add_argument("--search", type=str, default="exhaustive", help=f"one of {SEARCH_MODES}")
    parser.add_argument("--order", type=str | None, default=None, help="evaluate only this order")
    parser.add_argument(
        "--predictor",
        type=str,
        default="calibration_kl",
        help=f"with --search predict: one of {PREDICTORS}",
    )
    parser.add_argument("--top_k", type=int, default=1, help="predicted orders to evaluate")
    parser.add_argument("--curve_bits", type=list[int] | None, default=None, help="RTN curve bits")
    parser.add_argument("--metric", type=str | None, default=None, help="default: the model's")
    parser.add_argument(
        "--higher_is_better", type=bool | None, default=None, help="default: the model's"
    )
    parser.add_argument("--output_dir", type=str, default="outputs/study")
    parser.add_argument("--cells_dir", type=str | None, default=None, help="shared cell cache")
    parser.add_argument("--reuse_prefixes", type=bool, default=True)
    parser.add_argument("--label", type=str | None, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed_everything before the study")
    parser.add_subclass_arguments(
        L.pytorch.loggers.Logger, "logger", required=False, help="e.g. WandbLogger or CSVLogger"
    )
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Separate ``--<Stage>.<argument> VALUE`` overrides from the parser's own arguments.

    Raises:
        PPQConfigError: when an override has no value.
    """
    rest: list[str] = []
    overrides: list[tuple[str, str, str]] = []
    i = 0
    while i < len(argv):
        match = OVERRIDE.match(argv[i])
        if match and match.group(1) not in TOP_LEVEL:
            stage, argument, value = match.groups()
            if value is None:
                if i + 1 >= len(argv):
                    raise PPQConfigError(f"{argv[i]} needs a value, e.g. {argv[i]}=0.5.")
                value, i = argv[i + 1], i + 1
            overrides.append((stage, argument, value))
        else:
            rest.append(argv[i])
        i += 1
    return rest, overrides


def _resolve_class(name: str, argument: str = "class_path") -> type:
    """The compression callback class ``name`` names (a class of ``ppq_lightning.callbacks`` or
    a full class path), its path checked before its module is imported.

    Raises:
        PPQConfigError: naming ``argument``, when ``name`` is no class path of an installed
            package or names no compression callback.
    """
    check_class_path(argument, name)
    if name in METHODS:  # a short name of the method registry: wanda, gptq, ...
        found = METHODS[name].callback
    elif "." not in name:
        found = getattr(callbacks, name, None)
    else:
        module, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attribute, None)
        except ImportError as err:
            raise bad_value(
                argument, name, f"a class path of an importable module ({err})"
            ) from err
    if not (isinstance(found, type) and issubclass(found, CompressionCallback)):
        raise PPQConfigError(
            f"{argument}={name!r} is not a compression callback; use a class of "
            "ppq_lightning.callbacks (e.g. Wanda, SparseGPT, GPTQ), a method of its registry "
            f"({', '.join(METHODS)}) or a full class path."
        )
    return found


def apply_overrides(stages: list[dict[str, Any]], overrides: list[tuple[str, str, str]]) -> None:
    """Apply stage overrides to the stage dicts (``{"class_path", "init_args"}``) in place.

    Raises:
        PPQConfigError: when no stage has the name, or the method has no such argument.
    """
    by_name = {(s.get("init_args") or {}).get("name"): s for s in stages}
    # a stage's class first, so that its other overrides are checked against the new class
    overrides = sorted(overrides, key=lambda o: o[1] != "class_path")
    for stage_name, argument, text in overrides:
        stage = by_name.get(stage_name)
        if stage is None:
            known = ", ".join(str(n) for n in by_name if n) or "none"
            raise PPQConfigError(
                f"--{stage_name}.{argument}: no stage is named {stage_name!r}; named stages: "
                f"{known}."
            )
        value = load_yaml(text)
        if argument == "class_path":
            old = callback_signature(_resolve_class(stage["class_path"]))
            cls = _resolve_class(value, f"--{stage_name}.class_path")
            new = callback_signature(cls)
            stage["class_path"] = f"{cls.__module__}.{cls.__qualname__}"
            stage["init_args"] = {  # what was set, not the old class's defaults
                k: v
                for k, v in stage["init_args"].items()
                if k in new
                and (
                    k not in old or old[k].default is inspect.Parameter.empty or v != old[k].default
                )
            }
            missing = [
                k
                for k, p in new.items()
                if p.default is inspect.Parameter.empty and k not in stage["init_args"]
            ]
            if missing and not any(o[0] == stage_name and o[1] in missing for o in overrides):
                raise PPQConfigError(
                    f"--{stage_name}.class_path {value}: {cls.__name__} needs "
                    f"{', '.join(missing)}; add --{stage_name}.{missing[0]} VALUE."
                )
            continue
        cls = _resolve_class(stage["class_path"])
        accepted = callback_parameters(cls)
        if argument not in accepted:
            raise PPQConfigError(
                f"--{stage_name}.{argument}: {cls.__name__} has no argument {argument!r}; it "
                f"takes {', '.join(sorted(accepted))}."
            )
        stage["init_args"][argument] = value


def check_curve_bits(curve_bits: Any, b_orig: int = 16) -> list[int]:
    """The bit widths of the RTN quantization-only curve, checked before any cell runs.

    Args:
        curve_bits: the bit widths (None: the default ``CURVE_BITS``; ``[]``: no curve).
        b_orig: bits of an original weight (the stages' ``b_orig``): every curve point must
            quantize, so ``C_Q = b_orig / bits > 1``.

    Returns:
        The bit widths, as a list.

    Raises:
        PPQConfigError: naming ``curve_bits`` and its value, when it is not a list of distinct
            integers from 2 to 8, each below ``b_orig``.
    """
    if curve_bits is None:
        curve_bits = list(CURVE_BITS)
    high = min(MAX_BITS, b_orig - 1)
    allowed = (
        f"a list of distinct integer bit widths from {MIN_BITS} to {high} (each below the "
        f"stages' b_orig={b_orig}, so that every curve point quantizes), or [] for no curve"
    )
    if not isinstance(curve_bits, (list, tuple)):
        raise bad_value("curve_bits", curve_bits, allowed)
    for bits in curve_bits:
        is_int = isinstance(bits, int) and not isinstance(bits, bool)
        if not is_int or not MIN_BITS <= bits <= high:
            raise bad_value("curve_bits", list(curve_bits), f"{allowed}; {bits!r} is not")
    repeated = sorted({b for b in curve_bits if list(curve_bits).count(b) > 1})
    if repeated:
        raise bad_value("curve_bits", list(curve_bits), f"{allowed}; {repeated[0]} repeats")
    return list(curve_bits)


def build_study(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    stages: list[CompressionCallback],
    search: str = "exhaustive",
    order: str | None = None,
    curve_bits: list[int] | None = None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
    output_dir: str = "outputs/study",
    cells_dir: str | None = None,
    reuse_prefixes: bool = True,
    label: str | None = None,
    logger: Any | None = None,
    tail: list[CompressionCallback] | None = None,
    predictor: str = "calibration_kl",
    top_k: int = 1,
) -> OrderStudy:
    """The :class:`~ppq_lightning.study.OrderStudy` of :func:`run_study`, every argument
    checked and nothing run yet. The arguments are ``OrderStudy``'s, with ``curve_bits`` (bit
    widths of the per-channel RTN quantization-only curve; None: 8, 6, 5, 4, 3, 2; ``[]``: no
    curve) in place of ``curve``.

    Raises:
        PPQConfigError: on a bad argument (see :func:`check_curve_bits` and ``OrderStudy``).
    """
    b_orig = stages[0].b_orig if stages else 16
    bits = check_curve_bits(curve_bits, b_orig)
    return OrderStudy(
        module,
        datamodule,
        stages,
        search=search,
        order=order,
        curve=RTNQuantization.curve(bits, b_orig=b_orig),
        metric=metric,
        higher_is_better=higher_is_better,
        output_dir=output_dir,
        cells_dir=cells_dir,
        reuse_prefixes=reuse_prefixes,
        label=label,
        logger=logger,
        tail=tail or (),
        predictor=predictor,
        top_k=top_k,
    )


def finish_study(study: OrderStudy, output_dir: str, logger: Any | None = None) -> StudyResult:
    """Run ``study`` and add it to the report in ``output_dir`` (the studies already there keep
    their rows; the same study run again replaces its row); the outcome goes to ``logger``."""
    result = study.run()
    write_report([result], output_dir, merge=True)
    log_result(result, logger, output_dir)
    return result


def _number(value: float, digits: str = ".4g") -> str:
    return format(value, digits)


def print_study(
    result: StudyResult,
    output_dir: str | Path,
    cells_dir: str | Path | None = None,
    console: Console | None = None,
) -> None:
    """Print what ``ppq study`` found: a table of the study's cells (the best order in bold),
    the best order, the PIH or predicted order, ``G``/``A``/``C*``, the budget, and where the
    report and the cells are.

    Args:
        result: the study's result.
        output_dir: the folder of the report (``studies.md``, ``cells.csv``, ...).
        cells_dir: the folder of the cells (None: ``output_dir/cells``).
        console: where to print (None: a ``rich`` console on stdout).
    """
    console = console or Console()
    folder = Path(output_dir)
    best = set(result.best_order.split("="))
    table = Table(
        title=f"study {result.label} ({result.search}, {result.metric})",
        box=box.SIMPLE_HEAD,
        caption="C: compression rate (nominal; measured from the tensors)",
    )
    table.add_column("order")
    table.add_column("kind")
    for column in (result.metric, "nominal C", "measured C", "sparsity", "bits", "seconds"):
        table.add_column(column, justify="right")
    for cell in result.cells():
        is_best = any(cell is result.orders.get(name) for name in best)
        table.add_row(
            cell.order,
            "best" if is_best else cell.kind,
            _number(cell.value),
            _number(cell.nominal_C, ".3g"),
            _number(cell.measured_C, ".3f"),
            _number(cell.sparsity, ".3f"),
            _number(cell.avg_bits, ".3g"),
            _number(cell.seconds, ".1f"),
            style="bold" if is_best else None,
        )
    console.print(table)
    top = result.best
    lines = [
        f"best order: {result.best_order} ({result.metric} {_number(top.value)}, measured C "
        f"{_number(top.measured_C, '.3f')})"
    ]
    if result.pih_order:
        verdict = {True: " (the best order)", False: " (not the best order)", None: ""}
        lines.append(f"PIH order: {result.pih_order}{verdict[result.pih_correct]}")
    if result.prediction:
        ranking = result.prediction["orders"]
        lines.append(f"predicted order ({result.prediction['predictor']}): {ranking[0]['order']}")
    if result.pair or result.cer:
        pairs = {**{f"C*[{n}]": v for n, v in result.cer.items()}, **result.pair}
        lines.append(", ".join(f"{k} = {_number(v)}" for k, v in pairs.items()))
    budget = result.budget
    lines.append(
        f"cells: {budget.evaluations} evaluated, {budget.cached} cached; stage applications: "
        f"{budget.applications} ({budget.applications_without_reuse} without prefix reuse)"
    )
    written = [
        name
        for name in ("studies.md", "studies.csv", "cells.csv", "report.json", STUDY_CONFIG)
        if (folder / name).is_file()
    ] + sorted(p.name for p in folder.glob("*.png"))
    studies = read_results(folder)
    count = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}"
    lines.append(f"report ({count}): {folder}/ {', '.join(written)}")
    same_label = sum(r.label == result.label for r in studies)
    if same_label > 1:
        lines.append(
            f"{same_label} studies of the report are labelled {result.label!r}: --label names "
            "a study's row."
        )
    lines.append(f"cells: {Path(cells_dir) if cells_dir is not None else folder / 'cells'}/")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def run_study(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    stages: list[CompressionCallback],
    output_dir: str = "outputs/study",
    logger: Any | None = None,
    **options: Any,
) -> StudyResult:
    """Run one :class:`~ppq_lightning.study.OrderStudy` and write its report to ``output_dir``
    (what ``ppq study`` calls); the outcome goes to ``logger``.

    Args:
        module, datamodule, stages, output_dir, logger: as in :func:`build_study`.
        **options: the other keyword arguments of :func:`build_study` (``search``, ``order``,
            ``curve_bits`` — bit widths of the per-channel RTN quantization-only curve, default
            8, 6, 5, 4, 3, 2, ``[]`` skips it — ``metric``, ``predictor``, ``top_k``, ...).

    Raises:
        PPQConfigError: on a bad argument, before any cell runs (see :func:`build_study`).
        TypeError: on a keyword :func:`build_study` does not take.
    """
    study = build_study(module, datamodule, stages, output_dir=output_dir, logger=logger, **options)
    return finish_study(study, output_dir, logger)


def check_study_arguments(cfg: Any) -> None:
    """Check the plain arguments of a parsed ``ppq study`` command before any class is built
    (a model loaded) or any file written.

    Raises:
        PPQConfigError: naming the argument and its value: ``--search``, ``--predictor``,
            ``--top_k``, ``--curve_bits`` (against the first stage's ``b_orig``),
            ``--output_dir`` and ``--cells_dir``; or when ``--stages`` is missing.
    """
    if not cfg.stages:
        raise PPQConfigError("ppq study needs --stages (a list of named compression callbacks).")
    check_choice("search", cfg.search, SEARCH_MODES)
    check_choice("predictor", cfg.predictor, PREDICTORS)
    check_int("top_k", cfg.top_k, minimum=1)
    b_orig = getattr(getattr(cfg.stages[0], "init_args", None), "b_orig", 16)
    check_curve_bits(cfg.curve_bits, b_orig if b_orig in (8, 16, 32) else 16)
    output_dir = check_folder("output_dir", cfg.output_dir)
    check_folder("cells_dir", cfg.cells_dir if cfg.cells_dir is not None else output_dir / "cells")


def study_main(argv: list[str]) -> StudyResult:
    """Parse ``ppq study`` arguments (with stage overrides), run the study, write the report.

    Every argument is checked before the model is built and before ``study.yaml`` is written
    to ``--output_dir``; a constructor's refusal (``paths: [/nope]`` of a text datamodule)
    is raised as its own :class:`PPQConfigError`. Under ``wandb agent`` (``WANDB_RUN_ID`` set)
    the report goes to ``OUTPUT_DIR/RUN_ID`` and the cells stay shared in ``OUTPUT_DIR/cells``
    (unless ``--cells_dir`` is given), so a sweep's points do not overwrite each other.

    Raises:
        PPQConfigError: on a bad argument or override (see :func:`check_study_arguments`,
            :func:`apply_overrides` and :func:`build_study`).
    """
    rest, overrides = split_overrides(argv)
    parser = study_parser()
    cfg = parser.parse_args(rest)
    if overrides:
        data = parser.dump(cfg, format="parser_mode", skip_validation=True)
        plain = load_yaml(data) if isinstance(data, str) else data
        apply_overrides(plain["stages"], overrides)
        cfg = parser.parse_object(plain)
    run_id = agent_run_id()
    if run_id is not None:
        if cfg.cells_dir is None:
            cfg.cells_dir = str(Path(cfg.output_dir) / "cells")
        cfg.output_dir = str(Path(cfg.output_dir) / run_id)
    check_study_arguments(cfg)
    note_progress(cells=cfg.cells_dir or str(Path(cfg.output_dir) / "cells"))  # if interrupted
    L.seed_everything(cfg.seed, verbose=False)  # a model built with random weights is seeded too
    init = instantiate_clearly(
        lambda: (
            parser.instantiate(cfg)
            if hasattr(parser, "instantiate")
            else parser.instantiate_classes(cfg)
        )
    )
    L.seed_everything(init.seed, verbose=False)  # the study's own draws, as before
    study = build_study(
        init.model,
        init.data,
        init.stages,
        search=init.search,
        order=init.order,
        curve_bits=init.curve_bits,
        metric=init.metric,
        higher_is_better=init.higher_is_better,
        output_dir=init.output_dir,
        cells_dir=init.cells_dir,
        reuse_prefixes=init.reuse_prefixes,
        label=init.label,
        logger=init.logger,
        tail=init.tail,
        predictor=init.predictor,
        top_k=init.top_k,
    )
    # what `ppq export --from-study` rebuilds the study's models from
    write_text_atomic(Path(init.output_dir) / STUDY_CONFIG, parser.dump(cfg, skip_none=False))
    result = finish_study(study, init.output_dir, init.logger)
    print_study(result, init.output_dir, init.cells_dir)
    return result
