"""Order advantage over a grid of (pruning intensity, bits): does the PIH predict the best order?

For every (sparsity, bits) pair an exhaustive two-stage ``OrderStudy`` (P>Q and Q>P) runs; all
pairs share one cell folder, so the dense model, each single stage and the RTN curve are
evaluated once. Reports, in ``--output``: ``studies.{csv,md}`` (A, G, C*_P - C_Q, best and PIH
order per pair), ``cells.csv``, plots, and ``summary.json`` / ``README.md`` with how often the
PIH prediction equals the exhaustive best order and what each search mode costs (evaluations,
stage applications with and without prefix reuse).

    python scripts/order_grid.py --output docs/results/order_grid_magnitude_rtn
    python scripts/order_grid.py --pruning sparsegpt --quantization gptq --output ...
    python scripts/order_grid.py --pruning block_removal --sparsities '[0.1, 0.2, 0.3]' ...
    python scripts/order_grid.py --model.init_args.model facebook/opt-125m \\
        --data.init_args.tokenizer facebook/opt-125m --output ...       # any HF causal LM
    python scripts/order_grid.py --config configs/experiments/fashion_mnist.yaml \\
        --pruning wanda --quantization gptq --bn_recalibration true --output ...  # a CNN
    python scripts/order_grid.py --sparsities '[0.5]' --bits '[4, "nvfp4", "mxfp4"]' \\
        --group_size 32 --output ...    # grid formats (ops.grid_formats) beside INT4 g32

Structured pruning: ``block_removal`` removes that fraction of the blocks (SLEB), ``depgraph``
that fraction of the channels of a CNN or ViT (Torch-Pruning). ``--bn_recalibration true``
re-estimates BatchNorm statistics after every cell's stages (vision models). The metric, its
direction and ``B_orig`` come from the model (perplexity and 16 bits for causal LMs, accuracy
and 32 bits for image classifiers).
Caveat on SmolLM2 (the default, offline): its weights come from a Q4_1 GGUF (a 4-bit grid per
block of 32), so quantization here is per output channel (``--group_size`` changes it).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from ppq_lightning.callbacks import RTNQuantization
from ppq_lightning.cli.experiments import (
    PRUNING_HELP,
    QUANTIZATION_HELP,
    command_line,
    experiment_parser,
    instantiate,
    provenance,
    pruner,
    quantizer,
    recalibration,
    write_results_readme,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.grid_formats import GridSpec
from ppq_lightning.reports import markdown_table, write_text_atomic
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.report import write_report


def grid_parser() -> Any:
    """The arguments of this script (also read by ``scripts/order_prediction.py``)."""
    parser = experiment_parser(__doc__)
    parser.add_argument(
        "--pruning",
        type=str,
        default="magnitude",
        help=PRUNING_HELP,
    )
    parser.add_argument("--quantization", type=str, default="rtn", help=QUANTIZATION_HELP)
    parser.add_argument("--sparsities", type=list[float], default=[0.2, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument(
        "--bits",
        type=list[int | str],
        default=[2, 3, 4, 8],
        help="bit widths or grid formats (nvfp4, mxfp4, fp8, Q4_K, ...: ops.grid_formats)",
    )
    parser.add_argument("--group_size", type=int | None, default=None)
    parser.add_argument(
        "--fallback",
        type=str | None,
        default=None,
        help="a grid format for the layers a format of --bits cannot hold (MXFP4's groups of "
        "32 on a conv reading 144 inputs); None refuses such a layer",
    )
    parser.add_argument("--curve_bits", type=list[int], default=[8, 6, 5, 4, 3, 2])
    parser.add_argument("--bn_recalibration", type=bool, default=False)
    return parser


def grid_points(args: Any) -> list[tuple[str, list]]:
    """Every (label, [P, Q]) pair of the grid, in order."""
    n = args.num_calibration_batches
    b_orig = getattr(args.model, "b_orig", 16)
    points = []
    for sparsity in args.sparsities:
        p = pruner(args.pruning, sparsity, f"P{round(sparsity * 100)}", n, b_orig)
        for bits in args.bits:
            group = args.group_size if isinstance(bits, int) else None  # a format fixes it
            extra = fallback_layers(args, bits)
            q = quantizer(args.quantization, bits, f"Q{bits}", n, group, b_orig=b_orig, **extra)
            points.append((f"{p.name}_{q.name}", [p, q]))
    return points


def fallback_layers(args: Any, bits: int | str) -> dict[str, Any]:
    """``{"layer_bits": {layer: fallback}}`` for the target layers of ``args.model`` whose
    shape the format ``bits`` cannot hold (empty without ``--fallback`` or for bits)."""
    if args.fallback is None or not isinstance(bits, str):
        return {}
    spec = GridSpec.of(bits)
    layers = {}
    for name, module in resolve_targets(args.model).items():
        try:
            spec.check_shape(tuple(weight_matrix(module).shape), name)
        except PPQConfigError:
            layers[f"^{re.escape(name)}$"] = args.fallback
    return {"layer_bits": layers} if layers else {}


def main(argv: list[str] | None = None) -> dict:
    args = instantiate(grid_parser(), argv)
    start = time.perf_counter()
    out = Path(args.output)
    n = args.num_calibration_batches
    b_orig = getattr(args.model, "b_orig", 16)
    curve = RTNQuantization.curve(args.curve_bits, b_orig=b_orig)
    tail = [recalibration(n, b_orig=b_orig)] if args.bn_recalibration else []
    results = []
    for label, stages in grid_points(args):
        study = OrderStudy(
            args.model, args.data, stages, curve=curve, output_dir=out, label=label, tail=tail
        )
        results.append(study.run())
    write_report(results, out)
    summary = summarize(results, len(curve))
    summary["metric"] = results[0].metric if results else None
    command = command_line(argv, "scripts/order_grid.py")
    summary.update(seconds=time.perf_counter() - start, **provenance(command))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_readme(out, summary, results)
    print(json.dumps(summary, indent=2))
    return summary


def summarize(results: list, n_curve: int) -> dict:
    """PIH hit rate and the budget of each search mode over the grid."""
    singles = {c.keys for r in results for c in r.singles.values()}
    pairs = len(results)
    hits = sum(bool(r.pih_correct) for r in results)
    applied = sum(r.budget.applications for r in results)
    without = sum(r.budget.applications_without_reuse for r in results)
    return {
        "pairs": pairs,
        "pih_correct": hits,
        "pih_hit_rate": hits / pairs if pairs else None,
        "p_first_wins": sum(r.best_order == "{}>{}".format(*r.stages) for r in results),
        "ties": sum("=" in r.best_order for r in results),
        "evaluations_exhaustive": 1 + len(singles) + n_curve + 2 * pairs,
        "evaluations_pih": 1 + len(singles) + n_curve + pairs,
        "evaluations_this_run": sum(r.budget.evaluations for r in results),
        "stage_applications_with_reuse": applied,
        "stage_applications_without_reuse": without,
    }


def write_readme(out: Path, summary: dict, results: list) -> None:
    rows = [
        {
            "pair": r.label,
            "dense": r.dense.value,
            "P alone": r.singles[r.stages[0]].value,
            "Q alone": r.singles[r.stages[1]].value,
            "P>Q": r.orders[f"{r.stages[0]}>{r.stages[1]}"].value,
            "Q>P": r.orders[f"{r.stages[1]}>{r.stages[0]}"].value,
            "A(P>Q)": r.pair["A"],
            "G(P,Q)": r.pair["G"],
            "C*_P - C_Q": r.pair.get("C*_P - C_Q"),
            "best": r.best_order,
            "PIH": r.pih_order,
            "PIH right": r.pih_correct,
        }
        for r in results
    ]
    write_results_readme(
        out,
        f"Order grid: {out.name}",
        summary["command"],
        f"Wall time {summary['seconds']:.0f} s. PIH predicted the best order in "
        f"{summary['pih_correct']} of {summary['pairs']} pairs; "
        f"P first won {summary['p_first_wins']}.\n"
        f"Search budget (schedule evaluations): exhaustive {summary['evaluations_exhaustive']}, "
        f"PIH-only {summary['evaluations_pih']}. Stage applications: "
        f"{summary['stage_applications_with_reuse']} with prefix reuse, "
        f"{summary['stage_applications_without_reuse']} without.",
        markdown_table(rows, list(rows[0])) if rows else "",
        f"M = {summary['metric']} (higher is better; -ppl for perplexity); "
        "A = M(P>Q) - M(Q>P) (> 0: prune first wins); G = M(P) - M(Q);\n"
        "C*_P: the RTN ratio at which quantization alone matches P (inf: worse than 2-bit RTN).",
    )


if __name__ == "__main__":
    main()
