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
import time
from pathlib import Path
from typing import Any

import torch

from ppq_lightning.calibration.blocks import find_block_chain
from ppq_lightning.calibration.data import batch_input
from ppq_lightning.callbacks import (
    GPTQ,
    CompressionCallback,
    DepGraphPruning,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.cli.experiments import (
    command_line,
    experiment_parser,
    instantiate,
    recalibration,
)
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.order.evaluation import evaluate_module
from ppq_lightning.reports import markdown_table, write_json, write_table, write_text_atomic


def methods(n: int, b_orig: int, nm_ignore: list[str]) -> dict[str, CompressionCallback]:
    """The methods by short name (``n`` calibration batches)."""
    common = {"b_orig": b_orig, "log_layers": False}
    calibrated = {**common, "num_calibration_batches": n}
    nm = {"pattern": "2:4", "ignore": nm_ignore or None}
    return {
        "rtn4": RTNQuantization(bits=4, name="rtn4", **common),
        "rtn3": RTNQuantization(bits=3, name="rtn3", **common),
        "gptq4": GPTQ(bits=4, name="gptq4", **calibrated),
        "gptq3": GPTQ(bits=3, name="gptq3", **calibrated),
        "magnitude50": MagnitudePruning(sparsity=0.5, name="magnitude50", **common),
        "magnitude2_4": MagnitudePruning(name="magnitude2_4", **nm, **common),
        "wanda50": Wanda(sparsity=0.5, name="wanda50", **calibrated),
        "wanda50_layer": Wanda(sparsity=0.5, scope="layer", name="wanda50_layer", **calibrated),
        "wanda2_4": Wanda(name="wanda2_4", **nm, **calibrated),
        "sparsegpt50": SparseGPT(sparsity=0.5, name="sparsegpt50", **calibrated),
        "sparsegpt2_4": SparseGPT(name="sparsegpt2_4", **nm, **calibrated),
        "channels30": DepGraphPruning(ratio=0.3, name="channels30", **common),
    }


def block_floor(model: Any, batches: list[Any]) -> float:
    """Seconds of one forward pass of the model over the calibration batches (the floor)."""
    with torch.no_grad():
        model.eval()
        model(batch_input(batches[0]))  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(batch_input(batch))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument("--methods", type=list[str] | None, default=None, help="default: all")
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
    nm_ignore = [rf"^{n}$" for n, m in targets.items() if weight_matrix(m).shape[1] % 4]
    table = methods(args.num_calibration_batches, b_orig, nm_ignore)
    chosen = args.methods or list(table)
    bn = recalibration(args.num_calibration_batches, b_orig=b_orig)
    chain = find_block_chain(module)
    floor = block_floor(module, calibration)
    dense = evaluate_module(module, evaluation)
    metric = getattr(module, "metric_name", "acc")
    rows: list[dict[str, Any]] = [
        {"method": "dense", **dense, "measured_C": 1.0, "seconds": 0.0, "block_passes": 0}
    ]

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
        row.update(x_floor=seconds / floor, block_passes=passes)
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
        "command": command_line(argv, f"scripts/{Path(__file__).name}"),
        "model": getattr(module, "hparams", {}).get("model"),
        "blocks": len(chain) if chain is not None else 0,
        "calibration_images": sum(len(batch_input(b)) for b in calibration),
        "evaluation_images": sum(len(batch_input(b)) for b in evaluation),
        "floor_seconds": floor,
        "nm_skipped_layers": [p[1:-1] for p in nm_ignore],
        "rows": rows,
    }
    write_json(out / "report.json", report)
    columns = ["method", metric, f"{metric}+BN", "measured_C", "sparsity", "seconds", "x_floor"]
    columns.append("block_passes")
    columns += [c for c in ("kl", "acc5") if c in rows[0]]
    text = [
        f"# Methods on {report['model']}",
        "",
        "Produced by:",
        "",
        f"    {report['command']}",
        "",
        f"{report['calibration_images']} calibration images, {report['evaluation_images']} "
        f"evaluation images; floor (one forward pass of the model over the calibration set) "
        f"{floor:.2f} s, {report['blocks']} blocks. `{metric}+BN`: after BatchNorm "
        "recalibration on the calibration images; `block_passes`: block forwards over the "
        f"calibration set made by the layer-wise engine ({report['blocks']} is one pass). 2:4 "
        "patterns skip "
        f"{len(nm_ignore)} layers whose input size is not a multiple of 4.",
        "",
        markdown_table(rows, columns),
    ]
    write_text_atomic(out / "README.md", "\n".join(text) + "\n")
    return report


if __name__ == "__main__":
    main()
