"""The joint structural + mixed-precision search against sequential stages at equal measured C.

On one model: ``ChannelPruning(ratio)`` then ``RTN(bits)`` (P>Q) and the reverse (Q>P), the
mixed-precision heuristic ``RTN(bits, promote=...)`` alone, and
``JointStructuralMixedPrecision`` with the budget set to the measured C of P>Q. Every variant
starts from the dense model and is evaluated on the evaluation data; seconds are compression
only. Output in ``--output``: ``variants.{csv,md}``, ``summary.json``, ``README.md``.

    python scripts/joint_vs_sequential.py --output docs/results/joint_vs_sequential_smollm2
    python scripts/joint_vs_sequential.py --config configs/experiments/fashion_mnist.yaml \\
        --channels depgraph --bn_recalibration true \\
        --output docs/results/joint_vs_sequential_fashion_mnist
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from ppq_lightning.callbacks import (
    ChannelPruning,
    DepGraphPruning,
    JointStructuralMixedPrecision,
    RTNQuantization,
)
from ppq_lightning.cli.experiments import (
    command_line,
    experiment_parser,
    instantiate,
    provenance,
    recalibration,
    write_results_readme,
)
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.errors import check_choice
from ppq_lightning.order.evaluation import evaluate_module
from ppq_lightning.reports import markdown_table, write_json, write_table


def parser() -> Any:
    p = experiment_parser(__doc__)
    p.add_argument("--ratio", type=float, default=0.25, help="channels removed per unit (P)")
    p.add_argument(
        "--channels",
        type=str,
        default="mlp",
        help="mlp (ChannelPruning of transformer MLPs) | depgraph (DepGraphPruning of a CNN)",
    )
    p.add_argument("--bits", type=int, default=4, help="bits of the uniform RTN (Q)")
    p.add_argument("--promote", type=dict, default={"bits": 8, "fraction": 0.1})
    p.add_argument("--promote_base_bits", type=int, default=3)
    p.add_argument("--joint_bits", type=list[int], default=[8, 6, 4, 3, 2])
    p.add_argument("--joint_keep", type=list[float], default=[1.0, 0.875, 0.75, 0.625, 0.5])
    p.add_argument("--score_batches", type=int, default=4)
    p.add_argument("--rescore_every", type=int, default=32)
    p.add_argument(
        "--bn_recalibration", type=bool, default=False, help="re-estimate BatchNorm after each"
    )
    return p


def run(
    model: Any, stages: list, calibration: list, evaluation: Any, b_orig: int, tail: list
) -> dict:
    """Apply ``stages`` to a copy of ``model``, then ``tail`` (BatchNorm re-estimation, not
    timed); its metrics, measured C and seconds."""
    model = copy.deepcopy(model)
    start = time.perf_counter()
    for stage in stages:
        stage.apply(model, dataloader=calibration)
    seconds = time.perf_counter() - start
    for stage in copy.deepcopy(tail):
        stage.apply(model, dataloader=calibration)
    summary = compression_summary(model, b_orig)
    metrics = evaluate_module(model, evaluation)
    return {"measured_C": summary.measured_C, **metrics, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    args = instantiate(parser(), argv)
    start = time.perf_counter()
    out = Path(args.output)
    n, b_orig = args.num_calibration_batches, getattr(args.model, "b_orig", 16)
    args.data.setup("validate")
    calibration = list(args.data.calibration_dataloader())[:n]
    evaluation = args.data.val_dataloader()
    common = {"b_orig": b_orig, "log_layers": False}
    tail = [recalibration(n, b_orig=b_orig)] if args.bn_recalibration else []

    check_choice("channels", args.channels, ("mlp", "depgraph"))

    def p() -> ChannelPruning | DepGraphPruning:
        if args.channels == "depgraph":
            return DepGraphPruning(ratio=args.ratio, name="P", **common)
        return ChannelPruning(ratio=args.ratio, num_calibration_batches=n, name="P", **common)

    def q() -> RTNQuantization:
        return RTNQuantization(bits=args.bits, name="Q", **common)

    rows = [{"variant": "dense", **run(args.model, [], calibration, evaluation, b_orig, tail)}]
    rows.append(
        {
            "variant": f"P{args.ratio}>Q{args.bits}",
            **run(args.model, [p(), q()], calibration, evaluation, b_orig, tail),
        }
    )
    rows.append(
        {
            "variant": f"Q{args.bits}>P{args.ratio}",
            **run(args.model, [q(), p()], calibration, evaluation, b_orig, tail),
        }
    )
    promote = RTNQuantization(
        bits=args.promote_base_bits, promote=args.promote, name="MP", **common
    )
    rows.append(
        {
            "variant": f"RTN{args.promote_base_bits} promote {args.promote}",
            **run(args.model, [promote], calibration, evaluation, b_orig, tail),
        }
    )
    budget = rows[1]["measured_C"]
    joint = JointStructuralMixedPrecision(
        budget=budget,
        bits=args.joint_bits,
        keep=args.joint_keep,
        num_calibration_batches=n,
        score_batches=args.score_batches,
        rescore_every=args.rescore_every,
        channels=args.channels,
        name="joint",
        **common,
    )
    rows.append(
        {
            "variant": f"joint (budget C={budget:.2f})",
            **run(args.model, [joint], calibration, evaluation, b_orig, tail),
        }
    )
    write_table(rows, out, "variants", formats=("csv", "md"))
    chosen = joint.result.layers
    summary = {
        "budget": budget,
        "joint_moves": len(joint.search_log),
        "joint_bits": {
            str(b): sum(m["bits"] == b for m in chosen.values()) for b in args.joint_bits
        },
        "joint_layers_with_channels_removed": sum(m["keep"] < 1 for m in chosen.values()),
        "joint_layers": len(chosen),
        "seconds": time.perf_counter() - start,
        **provenance(command_line(argv, "scripts/joint_vs_sequential.py")),
    }
    write_json(out / "summary.json", summary)
    write_results_readme(
        out,
        "Joint structural + mixed-precision search against sequential stages",
        summary["command"],
        markdown_table(rows),
        f"The joint search made {summary['joint_moves']} moves; layers per bit width "
        f"{summary['joint_bits']}; {summary['joint_layers_with_channels_removed']} of "
        f"{summary['joint_layers']} layers lost channels; wall time {summary['seconds']:.0f} s.",
    )
    return summary


if __name__ == "__main__":
    main()
