"""The demo: prune-then-quantize vs quantize-then-prune on SmolLM2-135M, offline.

For every (pruning, quantization) pair of the config (default
``configs/demo/magnitude_rtn.yaml``: {50% unstructured, 2:4} magnitude pruning x {4-bit, 8-bit}
per-channel RTN) an exhaustive ``OrderStudy`` evaluates the dense model, each method alone, the
RTN quantization-only curve (for C*) and both orders, on CPython's offline English text. All
pairs share one cell folder, so the dense model, single stages and the curve are evaluated once,
and a re-run recomputes nothing. The report (``studies.{csv,md}``, ``cells.csv``,
``report.json``, plots) goes to ``--output``.

Caveat: the offline SmolLM2 weights come from a Q4_1 GGUF file (4-bit grid per block of 32), so
4-bit quantization with group size 32 would be nearly free; the demo therefore quantizes per
output channel.

    python scripts/demo_order_study.py --output outputs/demo
    python scripts/demo_order_study.py --config configs/demo/sparsegpt_gptq.yaml
"""

from __future__ import annotations

import time
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser
from rich.console import Console
from rich.table import Table

from ppq_lightning.callbacks import CompressionCallback, RTNQuantization
from ppq_lightning.datamodules import TextDataModule
from ppq_lightning.models import CausalLMModule
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.report import write_report


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--model", default="smollm2-135m", help="HF id, local dir, smollm2-135m")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval_windows", type=int, default=12)
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--pruning", type=list[CompressionCallback], required=True)
    parser.add_argument("--quantization", type=list[CompressionCallback], required=True)
    default_config = Path(__file__).parents[1] / "configs" / "demo" / "magnitude_rtn.yaml"
    parser.default_config_files = [str(default_config)]
    args = parser.instantiate_classes(parser.parse_args())

    start = time.perf_counter()
    module = CausalLMModule(model=args.model)
    data = TextDataModule(
        source="pydoc",
        tokenizer=args.model,
        seqlen=args.seqlen,
        max_eval_windows=args.eval_windows,
        num_calibration_samples=args.calibration_samples,
    )
    curve = RTNQuantization.curve()
    results = []
    for p in args.pruning:
        for q in args.quantization:
            study = OrderStudy(
                module,
                data,
                [p, q],
                curve=curve,
                output_dir=args.output,
                label=f"{p.name}_{q.name}",
            )
            results.append(study.run())
    write_report(results, args.output)

    table = Table(
        title=f"Order study on {args.model} (val ppl, {args.eval_windows}x{args.seqlen} "
        "tokens of offline text)"
    )
    for column in (
        "P",
        "Q",
        "C",
        "dense",
        "P alone",
        "Q alone",
        "P>Q",
        "Q>P",
        "G(P,Q)",
        "A(P>Q)",
        "C*_P",
        "best",
        "PIH says",
        "PIH right",
    ):
        table.add_column(column, justify="right")
    for r in results:
        p, q = r.stages
        pq, qp = r.orders[f"{p}>{q}"], r.orders[f"{q}>{p}"]
        table.add_row(
            p,
            q,
            f"{pq.nominal_C:g} ({pq.measured_C:.2f})",
            f"{r.dense.value:.2f}",
            f"{r.singles[p].value:.2f}",
            f"{r.singles[q].value:.2f}",
            f"{pq.value:.2f}",
            f"{qp.value:.2f}",
            f"{r.pair['G']:+.2f}",
            f"{r.pair['A']:+.2f}",
            f"{r.cer[p]:.2f}",
            r.best_order,
            r.pih_order,
            "yes" if r.pih_correct else "no",
        )
    console = Console(width=200)
    console.print(table)
    console.print(
        "C: nominal (measured, counting scales, zeros and mask/index bits). "
        "M = -ppl; G = M(P) - M(Q); A = M(P>Q) - M(Q>P); C*_P: the RTN ratio that matches P."
    )
    console.print(
        f"Report: {args.output}/studies.md, studies.csv, cells.csv, report.json, *.png — wall time "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
