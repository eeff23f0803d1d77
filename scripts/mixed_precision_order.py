"""Progressive against regressive mixed precision: Q8>Q4>Q2 or Q2>Q4>Q8 over nested layer sets.

Three RTN stages quantize nested subsets of the layers: ``Q8`` every layer at 8 bits, ``Q4`` the
MLP projections at 4, ``Q2`` the MLP down projections at 2 (``--q4_layers`` / ``--q2_layers``
change the regexes). The progressive order (weaker first, as the PIH advises) ends with attention
at 8, gate/up at 4 and down at 2 bits. The regressive order quantizes the down projections to 2
bits first; the later, wider grids then re-quantize already damaged weights, so the model ends
*recorded* at 8 bits everywhere (a lower measured C) but keeps the 2-bit damage. All six orders
of the three stages are evaluated (an exhaustive ``OrderStudy``, prefixes reused).

    python scripts/mixed_precision_order.py --output docs/results/mixed_precision_order
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ppq_lightning.cli.experiments import (
    QUANTIZATION_HELP,
    command_line,
    experiment_parser,
    instantiate,
    quantizer,
    write_results_readme,
)
from ppq_lightning.reports import markdown_table, write_text_atomic
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.report import write_report


def main(argv: list[str] | None = None) -> list[dict]:
    parser = experiment_parser(__doc__)
    parser.add_argument("--quantization", type=str, default="rtn", help=QUANTIZATION_HELP)
    parser.add_argument("--q4_layers", type=str, default=r"mlp\.")
    parser.add_argument("--q2_layers", type=str, default=r"mlp\.down_proj")
    parser.add_argument("--group_size", type=int | None, default=None)
    args = instantiate(parser, argv)
    start = time.perf_counter()
    out, n = Path(args.output), args.num_calibration_batches
    stages = [
        quantizer(args.quantization, 8, "Q8", n, args.group_size),
        quantizer(args.quantization, 4, "Q4", n, args.group_size, targets=args.q4_layers),
        quantizer(args.quantization, 2, "Q2", n, args.group_size, targets=args.q2_layers),
    ]
    result = OrderStudy(args.model, args.data, stages, curve=[], output_dir=out).run()
    write_report([result], out)
    rows = [
        {
            "order": order,
            "kind": "progressive"
            if order == "Q8>Q4>Q2"
            else "regressive"
            if order == "Q2>Q4>Q8"
            else "",
            "value": cell.value,
            "avg_bits": cell.avg_bits,
            "nominal_C": cell.nominal_C,
            "measured_C": cell.measured_C,
        }
        for order, cell in sorted(result.orders.items(), key=lambda item: item[1].value)
    ]
    singles = {name: cell.value for name, cell in result.singles.items()}
    table = markdown_table(rows, list(rows[0]))
    write_text_atomic(
        out / "mixed_precision_order.json",
        json.dumps({"orders": rows, "singles": singles, "pih_order": result.pih_order}, indent=2),
    )
    write_results_readme(
        out,
        "Progressive vs regressive mixed precision",
        command_line(argv, "scripts/mixed_precision_order.py"),
        f"Wall time {time.perf_counter() - start:.0f} s. Dense {result.dense.value:.3f}; each "
        f"stage alone: {singles}. PIH order (weakest first): {result.pih_order}; best: "
        f"{result.best_order}.",
        table,
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
