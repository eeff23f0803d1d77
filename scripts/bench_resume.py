"""A calibrated stage killed (SIGKILL) at a random block and run again: same weights, seconds saved.

Issue #28 (point 4). A random-weight Llama of a real width (by default Llama-3-8B's: hidden
4096, MLP 14336, 32 query / 8 key-value heads) with a few blocks is compressed by GPTQ (or
Wanda) in three child processes, each building the same model from the same seed:

1. uninterrupted (``block_checkpoints=False``);
2. with ``block_checkpoints`` on, killed with SIGKILL as soon as ``--kill-block`` blocks are on
   disk (a seeded random block unless given), i.e. while the next block is being compressed;
3. the very same command as 2, which continues from the files 2 left.

It checks that run 3 ends with every tensor and every compression record of run 1 (a hash of
each state-dict entry), and reports the seconds of the stage in runs 1 and 3 (the difference is
what the resume saved), the seconds run 2 had spent when it was killed, and the bytes of the
block files on disk. Random weights are enough: this measures equality and time, not quality.

Usage::

    python scripts/bench_resume.py --output docs/results/resume_blocks
    python scripts/bench_resume.py --method wanda --blocks 2 --output /tmp/resume
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("gptq", "wanda"), default="gptq")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ's group size")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of 1 row")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="weights, data and the kill block")
    parser.add_argument(
        "--kill-block", type=int, default=None, help="blocks on disk when killed (1..blocks-1)"
    )
    parser.add_argument("--output", type=Path, default=None, help="report folder")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--progress", default="off", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the child: build, compress, hash ----------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppq_lightning.calibration.progress import state_digest
    from ppq_lightning.callbacks import GPTQ, Wanda

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.blocks,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seqlen, 128),
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, args.vocab, (1, args.seqlen), generator=generator)
        for _ in range(args.batches)
    ]
    built = time.perf_counter() - start
    progress = False if args.progress == "off" else args.progress
    common = {"num_calibration_batches": args.batches, "block_checkpoints": progress}
    if args.method == "gptq":
        stage = GPTQ(bits=4, group_size=args.group_size, **common)
    else:
        stage = Wanda(sparsity=0.5, **common)
    result = stage.apply(model, dataloader=batches)
    state = model.state_dict()
    report = {
        "build_seconds": built,
        "stage_seconds": result.seconds,
        "resumed_blocks": stage.calibration_report.resumed_blocks,
        "block_passes": stage.calibration_report.block_passes,
        "digests": {key: state_digest({key: value}) for key, value in state.items()},
    }
    args.child.write_text(json.dumps(report))


# -- the parent: three runs, one kill ----------------------------------------------------------
def _command(args: argparse.Namespace, out: Path, progress: str) -> list[str]:
    keep = [
        f"--method={args.method}",
        f"--blocks={args.blocks}",
        f"--hidden={args.hidden}",
        f"--mlp={args.mlp}",
        f"--heads={args.heads}",
        f"--kv-heads={args.kv_heads}",
        f"--vocab={args.vocab}",
        f"--group-size={args.group_size}",
        f"--batches={args.batches}",
        f"--seqlen={args.seqlen}",
        f"--seed={args.seed}",
    ]
    return [sys.executable, str(Path(__file__).resolve()), *keep, f"--child={out}",
            f"--progress={progress}"]  # fmt: skip


def _run(command: list[str], out: Path) -> dict:
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def _block_files(root: Path) -> list[Path]:
    return sorted((root / "ppq_progress").rglob("block-*.safetensors"))


def _killed(command: list[str], root: Path, blocks: int) -> tuple[float, int]:
    """Run ``command`` and SIGKILL it once ``blocks`` block files are on disk; return the
    seconds it ran and the bytes of its files."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    while process.poll() is None and len(_block_files(root)) < blocks:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    code = process.wait()
    seconds = time.perf_counter() - start
    if code != -signal.SIGKILL:
        raise SystemExit(f"the run to kill ended with {code} before the kill")
    return seconds, sum(p.stat().st_size for p in _block_files(root))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child is not None:
        child(args)
        return {}
    if args.blocks < 2:
        raise SystemExit("--blocks must be at least 2 (a kill between blocks)")
    kill = args.kill_block or random.Random(args.seed).randint(1, args.blocks - 1)
    if not 1 <= kill < args.blocks:
        raise SystemExit(f"--kill-block must be in 1..{args.blocks - 1}")
    work = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    plain = _run(_command(args, work / "plain.json", "off"), work / "plain.json")
    print(f"uninterrupted: stage {plain['stage_seconds']:.1f} s", flush=True)
    progress_root = work / "progress"
    resumed_command = _command(args, work / "resumed.json", str(progress_root))
    killed_seconds, file_bytes = _killed(resumed_command, progress_root, kill)
    print(f"killed after {killed_seconds:.1f} s with {kill} block(s) on disk", flush=True)
    resumed = _run(resumed_command, work / "resumed.json")
    print(f"resumed: stage {resumed['stage_seconds']:.1f} s", flush=True)
    differing = sorted(
        key
        for key in plain["digests"].keys() | resumed["digests"].keys()
        if plain["digests"].get(key) != resumed["digests"].get(key)
    )
    summary = {
        "command": shlex.join(["python", "scripts/bench_resume.py", *(argv or sys.argv[1:])]),
        "method": args.method,
        "blocks": args.blocks,
        "hidden": args.hidden,
        "mlp": args.mlp,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        "group_size": args.group_size,
        "calibration_tokens": args.batches * args.seqlen,
        "killed_with_blocks_on_disk": kill,
        "resumed_blocks": resumed["resumed_blocks"],
        "stage_seconds_uninterrupted": round(plain["stage_seconds"], 2),
        "stage_seconds_resumed": round(resumed["stage_seconds"], 2),
        "seconds_saved_by_resume": round(plain["stage_seconds"] - resumed["stage_seconds"], 2),
        "seconds_until_kill": round(killed_seconds, 2),
        "block_file_bytes_at_kill": file_bytes,
        "block_file_bytes_per_block": file_bytes // kill,
        "state_entries_compared": len(plain["digests"]),
        "state_entries_differing": len(differing),
        "bit_identical": not differing and plain["digests"].keys() == resumed["digests"].keys(),
        "progress_left_after_success": [str(p) for p in _block_files(progress_root)],
        "machine": f"{os.cpu_count()} CPU cores",
    }
    print(json.dumps(summary, indent=2))
    if args.output is not None:
        from ppq_lightning.reports import markdown_table, write_json, write_text_atomic

        write_json(args.output / "summary.json", summary)
        rows = [{k: v for k, v in summary.items() if k not in ("command",)}]
        write_text_atomic(
            args.output / "README.md",
            "# Resume after a SIGKILL at a random block\n\nProduced by:\n\n    "
            f"{summary['command']}\n\n{markdown_table(rows)}\n",
        )
    if not summary["bit_identical"]:
        raise SystemExit(f"the resumed run differs from the uninterrupted one: {differing[:5]}")
    return summary


if __name__ == "__main__":
    main()
