"""Every compression method on one image classifier: the metric of each method alone and of
both orders of chosen pairs, with and without BatchNorm recalibration, and each method's
compression time against the floor (one forward pass of the model's blocks over the
calibration set, which layer-wise calibration cannot beat).

    python scripts/vision_methods.py --config configs/experiments/fashion_mnist.yaml \\
        --output docs/results/vision_methods_fashion_mnist
    python scripts/vision_methods.py --config configs/experiments/efficientnet_lite0_photos.yaml \\
        --output docs/results/vision_methods_efficientnet_lite0

N:M patterns skip layers whose input size is not a multiple of M (a depthwise 3x3
convolution has 9 inputs per output); those layers are named in the report.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from ppq_lightning.calibration.blocks import find_block_chain
from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import batch_input
from ppq_lightning.calibration.engine import observing
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.callbacks import CompressionCallback
from ppq_lightning.callbacks.registry import build_stage
from ppq_lightning.cli.experiments import (
    command_line,
    experiment_parser,
    instantiate,
    provenance,
    recalibration,
    write_results_readme,
)
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.errors import bad_value
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.order.evaluation import evaluate_module
from ppq_lightning.reports import markdown_table, write_json, write_table

DEFAULT_METHODS = [
    "rtn4", "rtn3", "gptq4", "gptq3", "magnitude50", "magnitude2_4", "wanda50",
    "wanda50_layer", "wanda2_4", "sparsegpt50", "sparsegpt2_4", "channels30",
]  # fmt: skip
METHOD_NAME = re.compile(
    r"^(?:(?P<quant>rtn|gptq)(?P<bits>\d+)"
    r"|(?P<prune>magnitude|wanda|sparsegpt)(?:(?P<n>\d+)_(?P<m>\d+)|(?P<percent>\d+)(?P<layer>_layer)?)"
    r"|channels(?P<channels>\d+))$"
)
SHORT_FORMS = (
    "rtn<bits>, gptq<bits>, magnitude|wanda|sparsegpt<percent> or <N>_<M>, "
    "wanda<percent>_layer, channels<percent>, or a registry spec such as 'sqs:4' "
    "(METHOD[:INTENSITY][,ARGUMENT=VALUE...])"
)


def not_dividing(widths: dict[str, int], m: int) -> list[str]:
    """The layers whose input size is not a multiple of ``m`` (an N:M pattern skips them)."""
    return [layer for layer, cols in widths.items() if cols % m]


def method(name: str, n: int, b_orig: int, widths: dict[str, int]) -> CompressionCallback:
    """A method of the registry (``ppq_lightning.callbacks.registry``, ``n`` calibration
    batches) from this script's short forms, which name the rows of its reports: ``rtn4``,
    ``gptq3`` (bits), ``magnitude50``, ``wanda25``, ``sparsegpt50`` (percent sparsity),
    ``wanda50_layer`` (Wanda's per-layer scope), ``sparsegpt2_4`` (N:M; the layers whose input
    size ``widths[layer]`` M does not divide are left out), ``channels30`` (DepGraph channel
    ratio, percent); any other method as a registry spec (``sqs:4``, ``lora:8``).

    Raises:
        PPQConfigError: on a name of none of these forms.
    """
    common = {"b_orig": b_orig, "log_layers": False, "name": name, "num_calibration_batches": n}
    found = METHOD_NAME.match(name)
    if found is None:
        if ":" not in name and "," not in name:
            raise bad_value("methods", name, SHORT_FORMS)
        return build_stage(name, **common)
    part = found.groupdict()
    if part["quant"]:
        return build_stage(part["quant"], int(part["bits"]), **common)
    if part["channels"]:
        return build_stage("depgraph", int(part["channels"]) / 100, **common)
    if part["n"]:
        ignore = [rf"^{re.escape(layer)}$" for layer in not_dividing(widths, int(part["m"]))]
        pattern = f"{part['n']}:{part['m']}"
        return build_stage(part["prune"], pattern=pattern, ignore=ignore or None, **common)
    if part["layer"] and part["prune"] != "wanda":
        raise bad_value("methods", name, "the _layer suffix on wanda only")
    scope = {"scope": "layer"} if part["layer"] else {}
    return build_stage(part["prune"], int(part["percent"]) / 100, **scope, **common)


def block_floor(model: Any, batches: list[Any], statistic: str | None = None) -> float:
    """Seconds of one forward pass of the model over the calibration batches (the floor); with
    ``statistic`` (``"hessian"``), every target layer's statistic is accumulated on the way:
    the least any method reading it must do (for a k x k convolution ``X^T X`` costs
    ``k^2 C_in / C_out`` times the FLOPs of the layer's own forward)."""
    observe = LayerStatistics(statistic).observe if statistic else lambda *args: None
    with torch.no_grad(), evaluating(model):
        model(batch_input(batches[0]))  # warm-up
        with observing(resolve_targets(model), observe):
            start = time.perf_counter()
            for batch in batches:
                model(batch_input(batch))
            return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument(
        "--methods", type=list[str] | None, default=None, help=f"default: {DEFAULT_METHODS}"
    )
    parser.add_argument(
        "--pairs",
        type=list[list[str]],
        default=[["magnitude50", "rtn4"], ["sparsegpt50", "gptq4"], ["channels30", "rtn4"]],
        help="pairs whose two orders are measured",
    )
    args = instantiate(parser, argv)
    out = Path(args.output)
    module, data = args.model, args.data
    data.setup("validate")
    evaluation = list(data.val_dataloader())
    calibration = list(data.calibration_dataloader())[: args.num_calibration_batches]
    b_orig = getattr(module, "b_orig", 32)
    targets = resolve_targets(module)
    widths = {name: weight_matrix(layer).shape[1] for name, layer in targets.items()}
    chosen = args.methods or DEFAULT_METHODS
    wanted = dict.fromkeys([*chosen, *(name for pair in args.pairs for name in pair)])
    table = {name: method(name, args.num_calibration_batches, b_orig, widths) for name in wanted}
    bn = recalibration(args.num_calibration_batches, b_orig=b_orig)
    chain = find_block_chain(module)
    floor = block_floor(module, calibration)
    hessian_floor = block_floor(module, calibration, "hessian")
    dense = evaluate_module(module, evaluation)
    dense_bn = copy.deepcopy(module)
    copy.deepcopy(bn).apply(dense_bn, dataloader=calibration)
    metric = getattr(module, "metric_name", "acc")
    rows: list[dict[str, Any]] = [
        {"method": "dense", **dense, "measured_C": 1.0, "seconds": 0.0, "block_passes": 0}
    ]
    rows[0][f"{metric}+BN"] = evaluate_module(dense_bn, evaluation)[metric]

    def measure(label: str, stages: list[CompressionCallback]) -> None:
        model = copy.deepcopy(module)
        start, passes = time.perf_counter(), 0
        for stage in stages:
            stage = copy.deepcopy(stage)
            stage.apply(model, dataloader=calibration)
            report = getattr(stage, "calibration_report", None)
            passes += report.block_passes if report is not None else 0
        seconds = time.perf_counter() - start
        check_invariants(model)
        summary = compression_summary(model, b_orig)
        row = {"method": label, **evaluate_module(model, evaluation)}
        row.update(measured_C=summary.measured_C, sparsity=summary.sparsity, seconds=seconds)
        row.update(x_floor=seconds / floor, x_hessian_floor=seconds / hessian_floor)
        row["block_passes"] = passes
        recalibrated = copy.deepcopy(model)
        copy.deepcopy(bn).apply(recalibrated, dataloader=calibration)
        row[f"{metric}+BN"] = evaluate_module(recalibrated, evaluation)[metric]
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in chosen:
        measure(name, [table[name]])
    for first, second in args.pairs:
        measure(f"{first}>{second}", [table[first], table[second]])
        measure(f"{second}>{first}", [table[second], table[first]])
    write_table(rows, out, "methods")
    report = {
        **provenance(command_line(argv, f"scripts/{Path(__file__).name}")),
        "model": getattr(module, "hparams", {}).get("model"),
        "blocks": len(chain) if chain is not None else 0,
        "calibration_images": sum(len(batch_input(b)) for b in calibration),
        "evaluation_images": sum(len(batch_input(b)) for b in evaluation),
        "floor_seconds": floor,
        "hessian_floor_seconds": hessian_floor,
        "not_multiple_of_4": not_dividing(widths, 4),
        "rows": rows,
    }
    write_json(out / "report.json", report)
    columns = ["method", metric, f"{metric}+BN", "measured_C", "sparsity", "seconds", "x_floor"]
    columns.append("x_hessian_floor")
    columns.append("block_passes")
    columns += [c for c in ("kl", "acc5") if c in rows[0]]
    write_results_readme(
        out,
        f"Methods on {report['model']}",
        report["command"],
        f"{report['calibration_images']} calibration images, {report['evaluation_images']} "
        f"evaluation images; floor (one forward pass of the model over the calibration set) "
        f"{floor:.2f} s, with every target's Hessian accumulated {hessian_floor:.2f} s (the "
        f"least GPTQ/SparseGPT can take), {report['blocks']} blocks. `{metric}+BN`: after "
        "BatchNorm "
        "recalibration on the calibration images; `block_passes`: block forwards over the "
        f"calibration set made by the layer-wise engine ({report['blocks']} is one pass). 2:4 "
        "patterns skip "
        f"{len(not_dividing(widths, 4))} layers whose input size is not a multiple of 4.",
        markdown_table(rows, columns),
    )
    return report


if __name__ == "__main__":
    main()
