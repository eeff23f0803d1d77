"""RTN and GPTQ on SmolLM2-135M onto the grids runtimes ship: INT4 per channel and in groups of
32, NVFP4, MXFP4, FP8, GGUF Q4_K and llama.cpp's Q4_K_M mixture, on the same windows.

Every run loads the model fresh (float32), applies one quantizer through its ordinary callback
(``stage.apply``) on the same calibration windows and is evaluated on the same evaluation
windows. Recorded per run: perplexity, seconds, the measured C, how many layers hold each grid
kind (a mixture chooses per layer), the invariants (``check_invariants``).

    python scripts/formats_smollm2.py --output docs/results/formats_smollm2

Caveats. SmolLM2's offline weights come from a Q4_1 GGUF file: every block of 32 consecutive
input weights of a row already lies on a 4-bit grid of its own. Grids whose groups split the
row at those boundaries (INT4 g32, MXFP4's 32, NVFP4's 16, the K-quants' sub-blocks of 32 or
16) can land near those levels; a per-channel grid cannot. So INT4 g32, MXFP4, NVFP4 and the
K-quants are favoured over INT4 per channel here, by an amount this model cannot tell apart from
the formats' own quality. And SmolLM2's hidden width 576 is no multiple of 256: a K-quant
super-block fits only the rows of ``down_proj`` (1536 inputs); llama.cpp writes the other
layers of a "Q4_K" file as Q5_0 (its ``tensor_type_fallback``), and so does this script (the
``Q4_K`` row) and the ``Q4_K_M`` mixture, which also takes Q8_0 where llama.cpp's rule asks for
Q6_K on such a row.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from dtype_smollm2 import window_arguments, windows  # the same windows as dtype_smollm2

from ppq_lightning.cli.experiments import source_commit
from ppq_lightning.reports import write_text_atomic

# the layers of SmolLM2 that read 576 inputs (no multiple of 256): llama.cpp's Q5_0 fallback
SMOLLM2_NOT_256 = r"(q|k|v|o|gate|up)_proj"
GRIDS = {  # a row -> the quantizer's intensity and arguments (callbacks/registry.build_stage)
    "int4_channel": (4, {}),
    "int4_g32": (4, {"group_size": 32}),
    "nvfp4": ("nvfp4", {}),
    "mxfp4": ("mxfp4", {}),
    "fp8": ("fp8", {}),
    "Q4_K": ("Q4_K", {"layer_bits": {SMOLLM2_NOT_256: "Q5_0"}}),
    "Q4_K_M": ("Q4_K_M", {}),
}
METHODS = ("rtn", "gptq")


def layer_grids(module: torch.nn.Module) -> dict[str, int]:
    """How many layers hold each grid (``int4 g32 sym``, ``nvfp4``, ``Q6_K``, ...)."""
    from ppq_lightning.compressed.state import compressed_modules

    counts: Counter[str] = Counter()
    for _, _, state in compressed_modules(module):
        if state.bits is None:
            continue
        if state.grid_format != "int":
            counts[state.grid_format] += 1
        else:
            group = f" g{state.group_size}" if state.group_size else ""
            counts[f"int{state.bits}{group}{' sym' if state.symmetric else ''}"] += 1
    return dict(sorted(counts.items()))


def run(method: str | None, grid: str | None, data: dict, args: argparse.Namespace) -> dict:
    """Quantize (``method`` onto ``grid``) and evaluate a fresh SmolLM2: its row."""
    from ppq_lightning import check_invariants, compression_summary
    from ppq_lightning.callbacks.registry import build_stage
    from ppq_lightning.models import CausalLMModule

    module = CausalLMModule(model="smollm2-135m")
    batches = [{"input_ids": w[None]} for w in data["calibration"]]
    start = time.perf_counter()
    if method is not None:
        intensity, arguments = GRIDS[grid]
        stage = build_stage(
            method,
            intensity,
            num_calibration_batches=len(batches),
            log_layers=False,
            **arguments,
        )
        stage.apply(module, dataloader=batches)
    seconds = time.perf_counter() - start
    checked = check_invariants(module)
    start = time.perf_counter()
    ppl = module.evaluate([{"input_ids": w[None]} for w in data["evaluation"]])["ppl"]
    summary = compression_summary(module)
    row = {
        "method": method or "dense",
        "grid": grid or "dense",
        "ppl": ppl,
        "seconds": seconds,
        "eval_seconds": time.perf_counter() - start,
        "measured_C": summary.measured_C,
        "avg_bits": summary.avg_bits,
        "layer_grids": layer_grids(module),
        "layers_checked": checked,
    }
    print(json.dumps(row), flush=True)
    del module
    gc.collect()
    return row


def table(rows: list[dict]) -> str:
    """The Markdown table of the README: one row per grid, RTN and GPTQ side by side."""
    by = {(r["method"], r["grid"]): r for r in rows}
    lines = [
        "| grid | measured C | RTN ppl | GPTQ ppl | layers |",
        "|---|---|---|---|---|",
    ]
    if ("dense", "dense") in by:
        lines.append(f"| dense | 1.00 | {by[('dense', 'dense')]['ppl']:.3f} | | |")
    for grid in GRIDS:
        found = [by.get((m, grid)) for m in METHODS]
        if not any(found):
            continue
        first = next(r for r in found if r)
        cells = [f"{r['ppl']:.3f}" if r else "" for r in found]
        layers = ", ".join(f"{k}: {v}" for k, v in first["layer_grids"].items())
        lines.append(f"| {grid} | {first['measured_C']:.3f} | {' | '.join(cells)} | {layers} |")
    return "\n".join(lines) + "\n"


def readme(summary: dict) -> str:
    """The folder's README.md: the command and the commit it ran at, the table, the caveats."""
    caveats = __doc__.split("\n\n")[-1].strip()
    return (
        "# Grid formats on SmolLM2-135M: RTN and GPTQ\n\n"
        f"Produced at commit `{summary['commit']}` by:\n\n    {summary['command']}\n\n"
        f"{summary['calibration_windows']} calibration and {summary['evaluation_windows']} "
        f"evaluation windows of {summary['seqlen']} tokens (pydoc), the same for every run; "
        f"perplexity (lower is better); wall time {summary['seconds']:.0f} s.\n\n"
        f"{table(summary['rows'])}\n{caveats}\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/formats_smollm2"))
    parser.add_argument("--grids", nargs="+", choices=list(GRIDS), default=list(GRIDS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    window_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    commit = source_commit()  # the code that runs: taken before, not after, a long run
    start = time.perf_counter()
    data = windows(args)
    rows = [run(None, None, data, args)]
    for grid in args.grids:
        for method in args.methods:
            rows.append(run(method, grid, data, args))
    summary = {
        "command": "python " + " ".join(["scripts/formats_smollm2.py", *(argv or sys.argv[1:])]),
        "commit": commit,
        "model": "smollm2-135m",
        "calibration_windows": len(data["calibration"]),
        "evaluation_windows": len(data["evaluation"]),
        "seqlen": args.seqlen,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "ppl": {f"{r['method']}:{r['grid']}": r["ppl"] for r in rows},
        "measured_C": {f"{r['method']}:{r['grid']}": r["measured_C"] for r in rows},
        "seconds": time.perf_counter() - start,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(args.output / "README.md", readme(summary))
    return summary


if __name__ == "__main__":
    main()
