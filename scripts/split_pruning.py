"""P -> Q against P1 -> Q -> P2 at equal total compression: does splitting the pruning help?

For each total sparsity ``s`` and bit width ``b``: ``P>Q`` and ``Q>P`` (prune to ``s`` once) and
``P1>Q>P2`` (prune to ``split * s``, quantize, prune to ``s``: a pruning stage's sparsity counts
the zeros already there, so the total and the nominal C are the same). Orders are evaluated with
``OrderStudy(order=...)``, sharing one cell folder (the dense model is evaluated once).

    python scripts/split_pruning.py --output docs/results/split_pruning
    python scripts/split_pruning.py --pruning sparsegpt --quantization gptq --output ...
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ppq_lightning.cli.experiments import (
    PRUNING_HELP,
    QUANTIZATION_HELP,
    command_line,
    experiment_parser,
    instantiate,
    pruner,
    quantizer,
    write_results_readme,
)
from ppq_lightning.reports import markdown_table, write_text_atomic
from ppq_lightning.study.engine import OrderStudy


def main(argv: list[str] | None = None) -> list[dict]:
    parser = experiment_parser(__doc__)
    parser.add_argument("--pruning", type=str, default="magnitude", help=PRUNING_HELP)
    parser.add_argument("--quantization", type=str, default="rtn", help=QUANTIZATION_HELP)
    parser.add_argument("--sparsities", type=list[float], default=[0.4, 0.5, 0.6])
    parser.add_argument("--bits", type=list[int], default=[3, 4])
    parser.add_argument("--split", type=float, default=0.5, help="P1's share of the sparsity")
    parser.add_argument("--group_size", type=int | None, default=None)
    args = instantiate(parser, argv)
    start = time.perf_counter()
    out, n = Path(args.output), args.num_calibration_batches
    rows = []
    for s in args.sparsities:
        for b in args.bits:
            q = quantizer(args.quantization, b, "Q", n, args.group_size)
            p = pruner(args.pruning, s, "P", n)
            p1, p2 = pruner(args.pruning, args.split * s, "P1", n), pruner(args.pruning, s, "P2", n)
            row = {"sparsity": s, "bits": b}
            for stages, order in (([p, q], "P>Q"), ([p, q], "Q>P"), ([p1, q, p2], "P1>Q>P2")):
                study = OrderStudy(
                    args.model,
                    args.data,
                    stages,
                    order=order,
                    curve=[],
                    output_dir=out,
                    label=f"s{s}_b{b}_{order}",
                )
                cell = study.run().orders[order]
                row[order] = cell.value
                row[f"C {order}"] = cell.nominal_C
            row["best"] = min(("P>Q", "Q>P", "P1>Q>P2"), key=lambda o: row[o])
            rows.append(row)
    table = markdown_table(rows, list(rows[0]))
    write_text_atomic(out / "split_pruning.json", json.dumps(rows, indent=2))
    write_results_readme(
        out,
        "Split pruning: P>Q, Q>P and P1>Q>P2 at equal total sparsity",
        command_line(argv, "scripts/split_pruning.py"),
        f"Wall time {time.perf_counter() - start:.0f} s; values are the evaluation metric "
        "(perplexity: lower is better); C is the nominal compression rate.",
        table,
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
