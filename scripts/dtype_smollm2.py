"""GPTQ-4 and SparseGPT-50 on SmolLM2-135M held in float32 and in bf16 (or fp16), on the same
windows: perplexity, and how far the two runs' decisions agree.

Each dtype loads the model with ``CausalLMModule(model="smollm2-135m", dtype=...)`` (the bf16
model is the float32 one rounded once to bf16, as a user loading it in bf16 gets it), and every
method runs through its ordinary callback (``stage.apply``) on the same calibration windows,
its statistics summed in float32 whatever the model's dtype; every run is evaluated on the same
evaluation windows. Recorded per run: perplexity, seconds, the measured C, the dtype of every
weight after the stage, the invariants (``check_invariants``: pruned entries exactly zero, every
quantized weight the model's-dtype rounding of a grid point); per method, the share of mask
entries (SparseGPT) and of integer codes (GPTQ, read back from the weights on each run's own
grid) that are the same in both dtypes.

    python scripts/dtype_smollm2.py --output docs/results/dtype_smollm2

Caveat: SmolLM2's offline weights come from a Q4_1 GGUF file (a 4-bit grid per block of 32
columns), so GPTQ runs per output channel (no groups), where 4 bits is a real perturbation.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ppq_lightning.reports import write_text_atomic

METHODS = {  # a row -> its stage as a method registry spec (callbacks/registry.py)
    "dense": None,
    "gptq4": "gptq:4",
    "sparsegpt50": "sparsegpt:0.5",
}
DTYPES = ("float32", "bfloat16", "float16")


def git_commit() -> dict[str, object]:
    """The commit the script runs at, and whether the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def window_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of :func:`windows`: calibration and evaluation windows and their length."""
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)


def windows(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The calibration and evaluation windows every run shares (token ids)."""
    from ppq_lightning.datamodules import TextDataModule

    data = TextDataModule(
        source="pydoc",
        tokenizer="smollm2-135m",
        seqlen=args.seqlen,
        num_calibration_samples=args.calibration_samples,
        max_eval_windows=args.eval_windows,
    )
    return {"calibration": data.calibration_windows(), "evaluation": data.eval_windows}


def decisions(module: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every compressed layer's mask and integer codes (read back from its weight), on CPU."""
    from ppq_lightning.compressed.state import compressed_modules
    from ppq_lightning.modules.views import weight_matrix

    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer, state in compressed_modules(module):
        entry = {}
        if state.mask is not None:
            entry["mask"] = state.mask.cpu()
        if state.grid is not None:
            codes = state.grid.quantize(weight_matrix(layer).detach().float())
            entry["codes"] = codes.to(torch.uint8).cpu()
        found[name] = entry
    return found


def agreement(a: dict, b: dict, key: str) -> float | None:
    """The share of entries of ``key`` (mask or codes) equal in both runs, over all layers."""
    same = total = 0
    for name, entry in a.items():
        if key in entry and key in b.get(name, {}):
            same += int((entry[key] == b[name][key]).sum())
            total += entry[key].numel()
    return same / total if total else None


def run(spec: str | None, dtype: str, data: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """Compress (``spec``) and evaluate SmolLM2 held in ``dtype``: its row and its decisions."""
    from ppq_lightning import check_invariants, compression_summary
    from ppq_lightning.callbacks.registry import build_stage
    from ppq_lightning.models import CausalLMModule

    module = CausalLMModule(model="smollm2-135m", dtype=dtype)
    batches = [{"input_ids": w[None]} for w in data["calibration"]]
    start = time.perf_counter()
    if spec is not None:
        stage = build_stage(spec, num_calibration_batches=len(batches), log_layers=False)
        stage.apply(module, dataloader=batches)
    seconds = time.perf_counter() - start
    weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
    checked = check_invariants(module)
    start = time.perf_counter()
    ppl = module.evaluate([{"input_ids": w[None]} for w in data["evaluation"]])["ppl"]
    row = {
        "dtype": dtype,
        "method": args.current,
        "spec": spec,
        "ppl": ppl,
        "seconds": seconds,
        "eval_seconds": time.perf_counter() - start,
        "measured_C": compression_summary(module).measured_C if spec is not None else 1.0,
        "weight_dtypes": weight_dtypes,
        "layers_checked": checked,
    }
    print(json.dumps(row), flush=True)
    found = decisions(module)
    del module
    gc.collect()
    return row, found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/dtype_smollm2"))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    window_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    state = git_commit()  # the code that runs: taken before, not after, a long run
    start = time.perf_counter()
    data = windows(args)
    rows: list[dict] = []
    agreements: dict[str, dict[str, float | None]] = {}
    for method in args.methods:
        args.current = method
        found = {}
        for dtype in args.dtypes:
            row, found[dtype] = run(METHODS[method], dtype, data, args)
            rows.append(row)
        reference = args.dtypes[0]
        for dtype in args.dtypes[1:]:
            agreements[f"{method}:{dtype}"] = {
                "against": reference,
                "mask_equal": agreement(found[reference], found[dtype], "mask"),
                "codes_equal": agreement(found[reference], found[dtype], "codes"),
            }
    ppl = {(r["method"], r["dtype"]): r["ppl"] for r in rows}
    summary = {
        "command": "python " + " ".join(["scripts/dtype_smollm2.py", *(argv or sys.argv[1:])]),
        **state,
        "model": "smollm2-135m",
        "calibration_windows": len(data["calibration"]),
        "evaluation_windows": len(data["evaluation"]),
        "seqlen": args.seqlen,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "ppl": {f"{m}:{d}": v for (m, d), v in ppl.items()},
        "agreement": agreements,
        "seconds": time.perf_counter() - start,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
