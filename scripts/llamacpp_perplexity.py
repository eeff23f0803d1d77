"""Optional check: llama.cpp's own perplexity of the K-quant GGUF files this project writes.

SmolLM2-135M is quantized to llama.cpp's Q4_K_M mixture by RTN and by GPTQ (the codes GPTQ
chose, packed by ``ops.kquants.pack_kquant``) and exported with ``ppq_lightning.export(...,
"gguf", ...)``; llama.cpp's ``llama-perplexity`` then reads each file and scores a held-out text
(``--ctx`` tokens per chunk, the second half of each chunk scored, as llama.cpp does). Beside it,
the same text is scored the same way by our in-memory model (the HF tokenizer in place of
llama.cpp's, BOS as the file's metadata says), so the two numbers differ only by tokenization
and llama.cpp's arithmetic.

``llama-perplexity`` is built once from the llama.cpp that llama-cpp-python's source
distribution vendors (``pip download --no-binary :all: llama-cpp-python``), with cmake and a C++
compiler, into ``--build-dir``; or give ``--llama-perplexity PATH``. When it cannot be had (no
cmake or compiler, no registry, a failed build) the script prints why and exits 0 with
``skipped`` in its summary: the check is optional, nothing else depends on it. RTN onto Q8_0 (a
near-dense model in GGUF's 8-bit blocks) is the reference row: the ratio of the two scores there
is what the tokenizers and the arithmetics alone make of the same text.

    python scripts/llamacpp_perplexity.py --output docs/results/llamacpp_perplexity
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from ppq_lightning.cli.experiments import source_commit
from ppq_lightning.reports import write_text_atomic

SDIST = "llama-cpp-python"
TARGET = "llama-perplexity"


def build_llama_perplexity(build_dir: Path) -> tuple[Path | None, str]:
    """``llama-perplexity`` built from llama-cpp-python's vendored llama.cpp (cached in
    ``build_dir``), or None with the reason it could not be built."""
    binary = build_dir / "build" / "bin" / TARGET
    if binary.exists():
        return binary, "cached build"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not installed"
    build_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(build_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             SDIST, "-d", str(build_dir)],
            capture_output=True, text=True,
        )  # fmt: skip
        sdists = sorted(build_dir.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not sdists:
            return None, f"pip download {SDIST} failed: {done.stderr.strip()[-300:]}"
    with tarfile.open(sdists[-1]) as archive:
        archive.extractall(build_dir, filter="data")
    source = next(build_dir.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if source is None:
        return None, f"{sdists[-1].name} has no vendor/llama.cpp"
    flags = ["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    for command in (
        ["cmake", "-S", str(source), "-B", str(build_dir / "build"), *flags],
        ["cmake", "--build", str(build_dir / "build"), "--target", TARGET, "-j", "2"],
    ):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return None, f"{' '.join(command[:2])} failed: {done.stderr.strip()[-300:]}"
    return (binary, "built") if binary.exists() else (None, f"the build made no {TARGET}")


def llama_cpp_ppl(
    binary: Path, gguf: Path, text: Path, ctx: int, threads: int
) -> tuple[float, int | None]:
    """The final perplexity ``llama-perplexity`` prints for ``gguf`` on ``text``, and over how
    many chunks (its tokenizer's count).

    Raises:
        RuntimeError: when it exits non-zero or prints no final estimate.
    """
    done = subprocess.run(
        [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", str(threads)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode or found is None:
        raise RuntimeError(f"{TARGET} on {gguf} failed: {(done.stderr or done.stdout)[-500:]}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", done.stdout + done.stderr)
    return float(found.group(1)), int(chunks.group(1)) if chunks else None


def ours_like_llama_cpp(
    model: torch.nn.Module,
    ids: torch.Tensor,
    ctx: int,
    bos: int | None,
    chunks: int | None = None,
) -> float:
    """Perplexity of ``model`` on token ids ``ids`` as ``llama-perplexity`` computes it: chunks
    of ``ctx`` tokens (the first replaced by BOS when the file adds one), each scoring the
    predictions of its tokens ``ctx/2 + 1 .. ctx - 1``; the first ``chunks`` chunks (None:
    every whole one)."""
    nll, count = 0.0, 0
    first = ctx // 2
    with torch.no_grad():
        starts = range(0, ids.numel() - ctx + 1, ctx)
        for start in starts if chunks is None else starts[:chunks]:
            chunk = ids[start : start + ctx].clone()
            if bos is not None:
                chunk[0] = bos
            logits = model(chunk[None]).logits[0].float()
            targets = chunk[first + 1 :]
            scored = logits[first : ctx - 1]
            nll += torch.nn.functional.cross_entropy(scored, targets, reduction="sum").item()
            count += targets.numel()
    return math.exp(nll / count)


def readme(summary: dict) -> str:
    """The folder's README.md: the command, the commit, llama.cpp's version and the rows."""
    lines = [
        "# llama.cpp's own perplexity of our GGUF files (SmolLM2-135M)",
        f"Produced at commit `{summary['commit']}` by:",
        f"    {summary['command']}",
        f"llama.cpp: {(summary.get('llama_cpp_version') or '?').splitlines()[0]}; "
        f"{summary.get('ctx')}-token chunks, the second half of each scored, over the chunks "
        "llama.cpp's tokenizer makes.",
        "| method | format | file MB | measured C | llama.cpp ppl | ours, same text |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['method']} | {r['format']} | {r['file_MB']:.1f} | {r['measured_C']:.3f} | "
            f"{r['ppl_llama_cpp']:.4f} | {r['ppl_ours']:.4f} |"
            for r in summary.get("rows", [])
        ),
    ]
    if "skipped" in summary:
        lines[3:] = [f"Skipped: {summary['skipped']}."]
    return "\n\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/llamacpp_perplexity"))
    parser.add_argument("--build-dir", type=Path, default=Path("outputs/llama.cpp"))
    parser.add_argument("--llama-perplexity", type=Path, default=None)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["rtn:Q8_0", "rtn:Q4_K_M", "gptq:Q4_K_M"],
        help="METHOD:FORMAT quantizers; rtn:Q8_0 is the near-dense reference of the tokenizers' "
        "and arithmetics' difference",
    )
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    commit = source_commit()
    command = "python " + " ".join(["scripts/llamacpp_perplexity.py", *(argv or sys.argv[1:])])
    args.output.mkdir(parents=True, exist_ok=True)
    if args.llama_perplexity is not None:
        binary, how = args.llama_perplexity, "given"
    else:
        binary, how = build_llama_perplexity(args.build_dir)
    if binary is None:
        summary = {"command": command, "commit": commit, "skipped": how}
        print(f"skipped: llama.cpp's {TARGET} is unavailable here ({how})")
        write_text_atomic(args.output / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomic(args.output / "README.md", readme(summary))
        return summary

    import gguf

    import ppq_lightning
    from ppq_lightning.callbacks.registry import build_stage
    from ppq_lightning.datamodules import TextDataModule
    from ppq_lightning.models import CausalLMModule
    from ppq_lightning.models.loading import load_tokenizer

    data = TextDataModule(
        source="pydoc",
        tokenizer="smollm2-135m",
        seqlen=args.ctx,
        num_calibration_samples=args.calibration_samples,
        max_eval_windows=args.eval_windows,
    )
    calibration = [{"input_ids": w[None]} for w in data.calibration_windows()]
    held_out = torch.cat(list(data.eval_windows))
    tokenizer = load_tokenizer("smollm2-135m")
    text = args.output / ".held_out.txt"
    text.write_text(tokenizer.decode(held_out.tolist()))
    ids = torch.tensor(tokenizer.encode(text.read_text(), add_special_tokens=False))
    rows = []
    for case in args.cases:
        method, _, format = case.partition(":")
        module = CausalLMModule(model="smollm2-135m")
        start = time.perf_counter()
        build_stage(
            method, format, num_calibration_batches=len(calibration), log_layers=False
        ).apply(module, dataloader=calibration)
        seconds = time.perf_counter() - start
        folder = args.output / "exports" / f"{method}_{format}"
        manifest = ppq_lightning.export(module, "gguf", folder, overwrite=True)
        reader = gguf.GGUFReader(str(folder / "model.gguf"))
        field = reader.fields.get("tokenizer.ggml.add_bos_token")
        adds_bos = bool(field.parts[field.data[0]][0]) if field is not None else False
        bos_field = reader.fields.get("tokenizer.ggml.bos_token_id")
        bos = int(bos_field.parts[bos_field.data[0]][0]) if adds_bos and bos_field else None
        llama_ppl, llama_chunks = llama_cpp_ppl(
            binary, folder / "model.gguf", text, args.ctx, args.threads
        )
        row = {
            "method": method,
            "format": format,
            "seconds": seconds,
            "file_MB": manifest["bytes"] / 1e6,
            "measured_C": manifest["measured_C"],
            "ppl_ours": ours_like_llama_cpp(  # over as many chunks as llama.cpp's tokens make
                module.model.eval(), ids, args.ctx, bos, llama_chunks
            ),
            "ppl_llama_cpp": llama_ppl,
            "chunks_ours": min(ids.numel() // args.ctx, llama_chunks or ids.numel()),
            "chunks_llama_cpp": llama_chunks,
            "bos": bos,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(folder)
    text.unlink()
    shutil.rmtree(args.output / "exports", ignore_errors=True)
    summary = {
        "command": command,
        "commit": commit,
        "llama_perplexity": how,
        "llama_cpp_version": subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True
        ).stderr.strip(),
        "ctx": args.ctx,
        "tokens": ids.numel(),
        "rows": rows,
        "ppl": {
            f"{r['method']}:{r['format']}:{k}": r[k]
            for r in rows
            for k in ("ppl_ours", "ppl_llama_cpp")
        },
    }
    write_text_atomic(args.output / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(args.output / "README.md", readme(summary))
    return summary


if __name__ == "__main__":
    main()
