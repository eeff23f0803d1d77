"""The demo: prune-then-quantize vs quantize-then-prune, offline.

For every (pruning, quantization) pair of the config an exhaustive ``OrderStudy`` evaluates the
dense model, each method alone, the RTN quantization-only curve (for C*) and both orders. All
pairs share one cell folder, so the dense model, single stages and the curve are evaluated once,
and a re-run recomputes nothing. The report (``studies.{csv,md}``, ``cells.csv``,
``report.json``, plots) goes to ``--output``.

- ``configs/demo/magnitude_rtn.yaml`` (``make demo``): SmolLM2-135M, {50% unstructured, 2:4}
  magnitude pruning x {4, 8}-bit per-channel RTN, on CPython's offline English text. The
  offline SmolLM2 weights come from a Q4_1 GGUF file (4-bit grid per block of 32), so 4-bit
  quantization with group size 32 would be nearly free: the demo quantizes per output channel.
- ``configs/demo/vision.yaml`` (``make demo-vision``): the Fashion-MNIST ResNet-18 the package
  ships, magnitude / SparseGPT pruning x RTN / GPTQ, with BatchNorm recalibrated after every
  cell (``tail``), accuracy on 2000 test images.

    python scripts/demo_order_study.py --output outputs/demo
    python scripts/demo_order_study.py --config configs/demo/sparsegpt_gptq.yaml
    python scripts/demo_order_study.py --config configs/demo/vision.yaml --output outputs/vision
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser
from rich.console import Console
from rich.table import Table

from ppq_lightning.callbacks import CompressionCallback, RTNQuantization
from ppq_lightning.cli.experiments import instantiate
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.report import write_report


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(L.LightningModule, "model", help="the dense model")
    parser.add_subclass_arguments(L.LightningDataModule, "data", help="evaluation/calibration")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--pruning", type=list[CompressionCallback], required=True)
    parser.add_argument("--quantization", type=list[CompressionCallback], required=True)
    parser.add_argument(
        "--tail", type=list[CompressionCallback], default=[], help="after every cell's stages"
    )
    parser.add_argument("--curve_bits", type=list[int], default=[8, 6, 5, 4, 3, 2])
    default_config = Path(__file__).parents[1] / "configs" / "demo" / "magnitude_rtn.yaml"
    parser.default_config_files = [str(default_config)]
    args = instantiate(parser)

    start = time.perf_counter()
    module, data = args.model, args.data
    b_orig = getattr(module, "b_orig", 16)
    curve = RTNQuantization.curve(args.curve_bits, b_orig=b_orig)
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
                tail=args.tail,
            )
            results.append(study.run())
    write_report(results, args.output)

    metric = results[0].metric
    model_name = getattr(module, "hparams", {}).get("model", type(module).__name__)
    table = Table(title=f"Order study on {model_name} ({metric})")
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
            f"{r.dense.value:.4g}",
            f"{r.singles[p].value:.4g}",
            f"{r.singles[q].value:.4g}",
            f"{pq.value:.4g}",
            f"{qp.value:.4g}",
            f"{r.pair['G']:+.4g}",
            f"{r.pair['A']:+.4g}",
            f"{r.cer[p]:.2f}",
            r.best_order,
            r.pih_order,
            "yes" if r.pih_correct else "no",
        )
    console = Console(width=200)
    console.print(table)
    console.print(
        "C: nominal (measured, counting scales, zeros and mask/index bits). "
        f"M = {metric if module.higher_is_better else '-' + metric}; G = M(P) - M(Q); "
        "A = M(P>Q) - M(Q>P); "
        "C*_P: the RTN ratio that matches P."
    )
    console.print(
        f"Report: {args.output}/studies.md, studies.csv, cells.csv, report.json, *.png — wall time "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
