"""What the exports weigh and whether runtimes read back the same model (SmolLM2-135M).

For each compression (RTN-4 and GPTQ-4 per channel, GPTQ-4 with groups of 64, SparseGPT-50 %
then GPTQ-4, mixed precision 8/4 bits), every format that can hold it is written; the table has
the file sizes against the dense model at B_orig = 16 bits and against the measured C, the export
seconds, and the perplexity of the model reloaded in a fresh process by plain transformers
(symmetric compressed-tensors), by ``ppq_lightning.export.load_pretrained`` (any grid) or by
``load_compressed`` (native), against ppq's in-memory perplexity (equal in float32). The
``ct-bfloat16`` rows are the compressed-tensors export in bfloat16 (scales rounded first), the
dtype a runtime would serve: their perplexity is the bfloat16 model's. GGUF needs
groups of 32 (SmolLM2's own Q4_1 grid: the weights are already on it), so it gets its own row.
The formats of issue #29 (``--cases '[rtn_nvfp4, rtn_mxfp4, rtn_fp8, rtn_q4_k_m, gptq_q4_k_m]'``)
go where they can: NVFP4 and MXFP4 to compressed-tensors (reloaded by ``load_pretrained``:
transformers' own FP4 path decodes in bf16), MXFP4 and Q4_K_M to GGUF (reloaded by
transformers' GGUF loader), FP8 to compressed-tensors (reloaded by transformers).

    python scripts/export_sizes.py --output docs/results/export_sizes
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ppq_lightning
from ppq_lightning.calibration.data import batch_input
from ppq_lightning.callbacks import GPTQ, RTNQuantization, SparseGPT
from ppq_lightning.cli.experiments import (
    command_line,
    experiment_parser,
    instantiate,
    provenance,
    write_results_readme,
)
from ppq_lightning.reports import markdown_table, write_json


def perplexity(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    """Perplexity over ``windows`` as the reload script computes it."""
    import math

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return math.exp(nll / count)


def load(folder: str, mode: str) -> torch.nn.Module:
    """The export at ``folder`` as a runtime reads it (``mode``), a dense causal LM."""
    from transformers import AutoModelForCausalLM

    from ppq_lightning.export import load_compressed, load_pretrained

    if mode == "transformers":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if mode == "gguf":
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="model.gguf", dtype=torch.float32
        )
    if mode == "load_pretrained":
        return load_pretrained(folder)
    if mode == "load_pretrained_bfloat16":
        return load_pretrained(folder, dtype="bfloat16")
    return load_compressed(folder).model


def reload_main(folder: str, mode: str, windows_file: str) -> None:
    """In a fresh process: load the export, print its perplexity and the load seconds."""
    windows = torch.load(windows_file, weights_only=True)
    start = time.perf_counter()
    model = load(folder, mode).eval()
    seconds = time.perf_counter() - start
    print("RESULT" + json.dumps({"ppl": perplexity(model, windows), "load_seconds": seconds}))


def reload(folder: Path, mode: str, windows_file: Path) -> dict:
    """:func:`reload_main` in a fresh Python process (what a user's runtime would see)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--reload", str(folder), mode, str(windows_file)],
        capture_output=True,
        text=True,
        env=env,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        return {"ppl": None, "load_seconds": None, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(line[len("RESULT") :])


INT_FORMATS = ["ppq", "compressed-tensors", "ct-bfloat16"]
Case = tuple[list[Any], list[str]]
CASES: dict[str, Callable[[int], Case]] = {  # label -> (stages, export formats), n calibration
    "rtn4": lambda n: ([RTNQuantization(bits=4, symmetric=True)], INT_FORMATS),
    "gptq4": lambda n: ([GPTQ(bits=4, symmetric=True, num_calibration_batches=n)], INT_FORMATS),
    "gptq4_g64_asym": lambda n: (
        [GPTQ(bits=4, group_size=64, num_calibration_batches=n)],
        INT_FORMATS,
    ),
    "sparsegpt50_gptq4": lambda n: (
        [
            SparseGPT(sparsity=0.5, name="P", num_calibration_batches=n),
            GPTQ(bits=4, symmetric=True, name="Q", num_calibration_batches=n),
        ],
        INT_FORMATS,
    ),
    "mixed_8_4": lambda n: (
        [RTNQuantization(bits=4, symmetric=True, layer_bits={r"self_attn": 8})],
        INT_FORMATS,
    ),
    "gptq4_g32_sym (gguf)": lambda n: (
        [GPTQ(bits=4, group_size=32, symmetric=True, num_calibration_batches=n)],
        ["gguf"],
    ),
    "rtn_nvfp4": lambda n: ([RTNQuantization(format="nvfp4")], ["ppq", "compressed-tensors"]),
    "rtn_mxfp4": lambda n: (
        [RTNQuantization(format="mxfp4")],
        ["ppq", "compressed-tensors", "gguf"],
    ),
    "rtn_fp8": lambda n: ([RTNQuantization(format="fp8")], ["ppq", "compressed-tensors"]),
    "rtn_q4_k_m": lambda n: ([RTNQuantization(format="Q4_K_M")], ["ppq", "gguf"]),
    "gptq_q4_k_m": lambda n: (
        [GPTQ(format="Q4_K_M", num_calibration_batches=n)],
        ["ppq", "gguf"],
    ),
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = experiment_parser(__doc__)
    parser.add_argument("--cases", type=list[str], default=list(CASES), help=f"of {list(CASES)}")
    args = instantiate(parser, argv)
    out, n = Path(args.output), args.num_calibration_batches
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    data.prepare_data()
    data.setup("validate")
    windows = [row for batch in data.val_dataloader() for row in batch_input(batch)]
    windows_file = out / ".windows.pt"
    torch.save(windows, windows_file)
    calibration = data.calibration_dataloader()
    cases = {label: make(n) for label, make in CASES.items() if label in args.cases}
    dense = args.model
    rows = []
    for label, (stages, formats) in cases.items():
        module = copy.deepcopy(dense)
        for stage in stages:
            stage.apply(module, dataloader=calibration)
        in_memory = perplexity(module.model, windows)
        for format in formats:
            folder = out / "exports" / f"{label.split()[0]}_{format}"
            start = time.perf_counter()
            if format == "ct-bfloat16":  # the same grids rounded to bfloat16 first
                manifest = ppq_lightning.export(
                    module, "compressed-tensors", folder, overwrite=True, dtype="bfloat16"
                )
            else:
                manifest = ppq_lightning.export(module, format, folder, overwrite=True)
            seconds = time.perf_counter() - start
            if format == "ppq":
                mode = "native"
            elif format == "gguf":
                mode = "gguf"
            elif format == "ct-bfloat16":
                mode = "load_pretrained_bfloat16"
            else:  # transformers' own path: symmetric integer grids and FP8 (docs/export.md)
                plain = "asym" not in label and "fp4" not in label
                mode = "transformers" if plain else "load_pretrained"
            reloaded = reload(folder, mode, windows_file)
            rows.append(
                {
                    "compression": label,
                    "format": format,
                    "MB": manifest["bytes"] / 1e6,
                    "dense_MB_at_16bit": manifest["dense_bytes_at_b_orig"] / 1e6,
                    "measured_C": manifest["measured_C"],
                    "file_C": manifest.get("file_C"),
                    "ppl_in_memory": in_memory,
                    "ppl_reloaded": reloaded["ppl"],
                    "reloaded_by": mode,
                    "export_s": seconds,
                    "load_s": reloaded["load_seconds"],
                }
            )
            print(rows[-1], flush=True)
            shutil.rmtree(folder)  # the table is the result, not 100 MB of weights
    windows_file.unlink()
    write_json(out / "export_sizes.json", {"rows": rows, **provenance(command_line(argv))})
    write_results_readme(
        out,
        "Export sizes and reloads (SmolLM2-135M)",
        command_line(argv),
        markdown_table(rows, list(rows[0])),
    )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reload"]:
        reload_main(*sys.argv[2:5])
    else:
        main()
