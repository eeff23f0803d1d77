"""Pruning vs quantization at equal compression (after Kuzmin et al., "Pruning vs Quantization:
Which is Better?"): the metric against the measured C of each method alone, and of the best
order of pruning and quantization together.

Every setting is one cell of an ``OrderStudy`` sharing one cell folder (``OUTPUT/cells``: the
dense model is evaluated once, a re-run recomputes nothing). For every pruning setting, ``C*``
is the measured C at which RTN alone reaches the same metric (interpolated in log C on the RTN
points), and ``Q better at equal C`` says whether quantization alone, at the pruning's own
measured C, would score higher (``C* > C``). Joint points: the exhaustive best order of the
first pruning method x the first quantization method at ``--joint_sparsities`` x
``--joint_bits``. Output in ``--output``: ``points.{csv,md}``, ``prune_vs_quantize.png``,
``summary.json`` and ``README.md`` (with Kuzmin et al.'s conclusion beside ours).

    python scripts/prune_vs_quantize.py --output docs/results/prune_vs_quantize_smollm2
    python scripts/prune_vs_quantize.py --config configs/experiments/fashion_mnist.yaml \\
        --structured '[depgraph]' --bn_recalibration true --output ...
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ppq_lightning.cli.experiments import (
    command_line,
    experiment_parser,
    instantiate,
    provenance,
    pruner,
    quantizer,
    recalibration,
    write_results_readme,
)
from ppq_lightning.order.metrics import compression_equivalence_ratio
from ppq_lightning.reports import markdown_table, write_json, write_table
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.plots import save_figure

KUZMIN = (
    "Kuzmin et al. (Qualcomm, NeurIPS 2023) compare magnitude pruning with uniform quantization "
    "at equal compression, analytically on weight distributions, per layer after post-training "
    "compression and after fine-tuning, and conclude that quantization generally outperforms "
    "pruning; only at very high compression ratios can pruning be the better choice."
)


def parser() -> Any:
    p = experiment_parser(__doc__)
    p.add_argument("--pruning", type=list[str], default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsities", type=list[float], default=[0.3, 0.5, 0.7])
    p.add_argument("--structured", type=list[str], default=[], help="block_removal|depgraph")
    p.add_argument("--structured_ratios", type=list[float], default=[0.1, 0.2])
    p.add_argument("--quantization", type=list[str], default=["rtn", "gptq"])
    p.add_argument("--bits", type=list[int], default=[8, 4, 3, 2])
    p.add_argument("--joint_sparsities", type=list[float], default=[0.3, 0.5])
    p.add_argument("--joint_bits", type=list[int], default=[4])
    p.add_argument("--bn_recalibration", type=bool, default=False)
    return p


def settings(args: Any) -> list[tuple[str, str, str, list]]:
    """``(family, method, setting, stages)`` of every point, in report order."""
    n, b_orig = args.num_calibration_batches, getattr(args.model, "b_orig", 16)
    points = []
    for method in args.pruning:
        for s in args.sparsities:
            stage = pruner(method, s, f"P{round(s * 100)}", n, b_orig)
            points.append(("pruning", method, f"sparsity {s}", [stage]))
    for method in args.structured:
        for r in args.structured_ratios:
            stage = pruner(method, r, f"S{round(r * 100)}", n, b_orig)
            points.append(("structured", method, f"ratio {r}", [stage]))
    for method in args.quantization:
        for b in args.bits:
            stage = quantizer(method, b, f"Q{b}", n, b_orig=b_orig)
            points.append(("quantization", method, f"{b} bits", [stage]))
    p_method, q_method = args.pruning[0], args.quantization[0]
    for s in args.joint_sparsities:
        for b in args.joint_bits:
            stages = [
                pruner(p_method, s, f"P{round(s * 100)}", n, b_orig),
                quantizer(q_method, b, f"Q{b}", n, b_orig=b_orig),
            ]
            points.append(("joint", f"{p_method} x {q_method}", f"sparsity {s}, {b} bits", stages))
    return points


def equivalent_c(rows: list[dict], dense_m: float) -> None:
    """Add ``C*`` and ``Q better at equal C`` to the pruning rows, from the RTN rows."""
    curve = [(1.0, dense_m)] + [
        (r["measured_C"], r["M"])
        for r in rows
        if r["family"] == "quantization" and r["method"] == "rtn"
    ]
    if len(curve) < 2:
        return
    for row in rows:
        if row["family"] in ("pruning", "structured", "joint"):
            c_star = compression_equivalence_ratio(curve, row["M"])
            row["C*"] = c_star
            row["Q better at equal C"] = c_star > row["measured_C"]


def plot(rows: list[dict], metric: str, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for family, method in dict.fromkeys((r["family"], r["method"]) for r in rows):
        mine = sorted(
            (r for r in rows if (r["family"], r["method"]) == (family, method)),
            key=lambda r: r["measured_C"],
        )
        xs, ys = [r["measured_C"] for r in mine], [r["value"] for r in mine]
        style = {"pruning": "o-", "structured": "s-", "quantization": "^--", "joint": "*"}[family]
        axes.plot(
            xs, ys, style, label=f"{method} ({family})", markersize=9 if family == "joint" else 5
        )
        if family == "joint":
            for r in mine:
                axes.annotate(r["best_order"], (r["measured_C"], r["value"]), fontsize=6)
    axes.set_xscale("log")
    if metric == "ppl":
        axes.set_yscale("log")
    axes.set_xlabel("measured C")
    axes.set_ylabel(metric)
    axes.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    args = instantiate(parser(), argv)
    start = time.perf_counter()
    out = Path(args.output)
    b_orig = getattr(args.model, "b_orig", 16)
    tail = (
        [recalibration(args.num_calibration_batches, b_orig=b_orig)]
        if args.bn_recalibration
        else []
    )
    rows, dense, metric = [], None, None
    for family, method, setting, stages in settings(args):
        label = f"{family}-{method}-{setting}".replace(" ", "")
        result = OrderStudy(
            args.model, args.data, stages, output_dir=out, label=label, tail=tail
        ).run()
        dense, metric = result.dense, result.metric
        if family == "joint":
            best = result.best_order.split("=")[0]
            cell = result.orders[best]
        else:
            cell = next(iter(result.orders.values()))
            best = ""
        rows.append(
            {
                "family": family,
                "method": method,
                "setting": setting,
                "measured_C": cell.measured_C,
                "value": cell.value,
                "M": cell.M,
                "best_order": best,
                "seconds": round(cell.seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    equivalent_c(rows, dense.M)
    write_table(rows, out, "points", formats=("csv", "md"))
    plot(rows, metric, out / "prune_vs_quantize.png")
    pruning = [r for r in rows if r["family"] in ("pruning", "structured") and "C*" in r]
    q_wins = sum(bool(r["Q better at equal C"]) for r in pruning)
    summary = {
        "metric": metric,
        "dense": dense.value,
        "pruning_points": len(pruning),
        "quantization_better_at_equal_C": q_wins,
        "seconds": time.perf_counter() - start,
        **provenance(command_line(argv, "scripts/prune_vs_quantize.py")),
    }
    write_json(out / "summary.json", summary)
    ours = (
        f"Here quantization alone (RTN) beats pruning alone at the pruning's own measured C in "
        f"{q_wins} of {len(pruning)} pruning points."
    )
    write_results_readme(
        out,
        "Pruning vs quantization at equal C",
        summary["command"],
        f"Dense {metric}: {dense.value:.4g}. Wall time {summary['seconds']:.0f} s.",
        markdown_table(rows),
        "![metric against measured C](prune_vs_quantize.png)",
        KUZMIN,
        ours,
    )
    return summary


if __name__ == "__main__":
    main()
