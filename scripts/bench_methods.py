"""Benchmark every method: perplexity, compression wall time, peak memory, forward passes.

Each method runs in its own subprocess (so peak memory is its own), on the same calibration and
evaluation windows, saved once to ``OUTPUT/data.pt``. With ``--peer`` the same windows go to
llm-compressor (run by ``.venv-peer/bin/python scripts/peer_llmcompressor.py``) and both rows
are printed with their ratios. The floor of layer-wise calibration is one forward pass of every
block over the calibration set: it is timed too, and each method's time is given as a multiple
of it.

    python scripts/bench_methods.py --output outputs/bench                   # SmolLM2, CPU
    python scripts/bench_methods.py --device cuda --random-weights           # timing on a GPU
    python scripts/bench_methods.py --methods gptq4 --depth 2                # 2x deeper model
    python scripts/bench_methods.py --methods gptq4 --peer --shuffle-seed 1  # windows reordered
    python scripts/bench_methods.py --methods gptq4 --peer --shuffle-seed none 1 2 3 4 5

With several ``--shuffle-seed`` values the whole benchmark runs once per order of the same
calibration windows (``OUTPUT/order_<seed>/``) and ``OUTPUT/spread.md`` gives each method's
perplexity per order, mean and standard deviation, ours and the peer's, and how often ours was
at least as good. Reordering changes nothing but float rounding, yet GPTQ's perplexity on
SmolLM2 moves by +-0.3 with it (its massive activations make the column walk chaotic): compare
tools on the spread, not on one draw.

Memory is the peak resident memory during the compression call minus the resident memory
before it (on CUDA: ``max_memory_allocated``). To make the CPU figure follow the live tensors
rather than glibc's retained heap, run with ``MALLOC_MMAP_THRESHOLD_=65536`` in the
environment (it reaches the peer's process too).

Caveat: SmolLM2's offline weights come from a Q4_1 GGUF (a 4-bit grid per block of 32), so
4-bit quantization with small groups is nearly free on them; per-channel rows are the honest
ones. Group size 64 stands for "g128" because 576 (SmolLM2's width) is not a multiple of 128.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from ppq_lightning.reports import write_text_atomic

METHODS = {  # a benchmark row -> its stages as method registry specs (callbacks/registry.py)
    "dense": [],
    "rtn4": ["rtn:4"],
    "gptq4": ["gptq:4"],
    "gptq4_f64": ["gptq:4,statistics_dtype=float64"],
    "gptq4_sym_act": ["gptq:4,symmetric=true,act_order=true"],
    "gptq3": ["gptq:3"],
    "gptq4_g64": ["gptq:4,group_size=64"],
    "magnitude50": ["magnitude:0.5"],
    "wanda50": ["wanda:0.5"],
    "sparsegpt50": ["sparsegpt:0.5"],
    "sparsegpt24": ["sparsegpt,pattern=2:4"],
    "sparsegpt50>gptq4": ["sparsegpt:0.5", "gptq:4"],
    "gptq4>sparsegpt50": ["gptq:4", "sparsegpt:0.5"],
    "sharing90": ["sharing:0.9,group_size=2"],
    "sharing90_whiten": ["sharing:0.9,group_size=2,whiten=true"],
    "sharing80": ["sharing:0.8,group_size=2"],
    "sharing80_whiten": ["sharing:0.8,group_size=2,whiten=true"],
    "sharing80_whiten>rtn4": ["sharing:0.8,group_size=2,whiten=true", "rtn:4"],
    "sharing80_whiten>gptq4": ["sharing:0.8,group_size=2,whiten=true", "gptq:4"],
}
CROSS_CORPUS = ("gptq4", "sparsegpt50", "wanda50")
# our method -> the llm-compressor run with the same settings (its GPTQ defaults are symmetric
# with static activation order: gptq4_sym_act; ours are asymmetric in natural order)
OUR_GPTQ = ["--asymmetric", "--actorder", "none"]
PEER = {
    "gptq4": ["--method", "gptq4", *OUR_GPTQ],
    "gptq4_sym_act": ["--method", "gptq4"],
    "gptq3": ["--method", "gptq3", *OUR_GPTQ],
    "gptq4_g64": ["--method", "gptq4g64", *OUR_GPTQ],
    "sparsegpt50": ["--method", "sparsegpt50"],
    "sparsegpt24": ["--method", "sparsegpt24"],
    "wanda50": ["--method", "wanda50"],
}
OTHER_CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "idlelib" / "NEWS.txt"


def load_module(args: argparse.Namespace):
    from ppq_lightning.models import CausalLMModule
    from ppq_lightning.models.loading import load_causal_lm

    if not args.random_weights:
        module = CausalLMModule(model=args.model)
    else:  # SmolLM2-135M's architecture with random weights: for timings on machines without it
        from transformers import AutoConfig

        config = AutoConfig.for_model(
            "llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            num_hidden_layers=30,
            tie_word_embeddings=True,
        ).to_dict()
        module = CausalLMModule.from_model(load_causal_lm(config={"model_type": "llama", **config}))
    if args.depth > 1:  # same width, more blocks (copies): memory must not grow with depth
        layers = module.model.model.layers
        module.model.model.layers = torch.nn.ModuleList(
            [copy.deepcopy(layers[i % len(layers)]) for i in range(len(layers) * args.depth)]
        )
        module.model.config.num_hidden_layers = len(module.model.model.layers)
    return module


def make_data(args: argparse.Namespace, path: Path) -> None:
    from ppq_lightning.datamodules import TextDataModule

    tokenizer = "bytes" if args.random_weights else args.model
    kwargs = {
        "tokenizer": tokenizer,
        "seqlen": args.seqlen,
        "num_calibration_samples": args.calibration_samples,
        "max_eval_windows": args.eval_windows,
    }
    data = TextDataModule(source="pydoc", **kwargs)
    windows = {"calibration": data.calibration_windows(), "evaluation": data.eval_windows}
    if args.cross_corpus:
        other = TextDataModule(
            source="pydoc",
            calibration_source="files",
            calibration_paths=[str(OTHER_CORPUS)],
            **kwargs,
        )
        windows["calibration_other"] = other.calibration_windows()
    if args.shuffle_seed is not None:  # same windows, another order: a float-level perturbation
        generator = torch.Generator().manual_seed(args.shuffle_seed)
        for key in [k for k in windows if k.startswith("calibration")]:
            windows[key] = windows[key][torch.randperm(len(windows[key]), generator=generator)]
    torch.save(windows, path)


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident memory now (Linux VmRSS), MiB; 0 where unknown."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return next(
        (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")),
        0.0,
    )


def reset_peak_memory(device: str) -> bool:
    """Start a new peak: CUDA's allocator statistics, or this process's peak RSS (Linux)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM (ru_maxrss) := current RSS
    except OSError:
        return False
    return True


def run_one(args: argparse.Namespace) -> dict:
    """Compress and evaluate one method in this process; print its JSON row."""
    from ppq_lightning import check_invariants, compression_summary
    from ppq_lightning.calibration.blocks import find_blocks
    from ppq_lightning.callbacks.registry import build_stage, parse_spec

    data = torch.load(args.data, weights_only=True)
    name, _, corpus = args.one.partition("@")
    calibration = data["calibration_other" if corpus == "news" else "calibration"]
    module = load_module(args).to(args.device)
    weights_mib = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    peak_before = peak_memory_mib(args.device)  # CPU: loading's peak RSS
    rss_before = current_rss_mib()
    reset = reset_peak_memory(args.device)
    batches = [{"input_ids": w[None]} for w in calibration]
    start = time.perf_counter()
    passes = 0
    for index, spec in enumerate(METHODS[name], start=1):
        where = {"device": args.device} if parse_spec(spec)[0].accepts("device") else {}
        stage = build_stage(
            spec,
            num_calibration_batches=len(batches),
            log_layers=False,
            name=f"s{index}",
            **where,
        )
        stage.apply(module, index=index, dataloader=batches)
        report = getattr(stage, "calibration_report", None)
        passes += report.block_passes if report is not None else 0
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_compress = peak_memory_mib(args.device) if reset else None
    peak = max(peak_before, peak_compress or 0.0) if args.device == "cpu" else peak_compress
    floor = None
    if name == "dense":  # time one forward of every block over the calibration set: the floor
        from ppq_lightning.calibration.engine import calibrate_sequentially
        from ppq_lightning.modules.targets import resolve_targets

        start = time.perf_counter()
        calibrate_sequentially(
            module,
            resolve_targets(module),
            batches,
            lambda *a: None,
            lambda layers: None,
            calibrate_on="original",
        )
        floor = time.perf_counter() - start
    check_invariants(module)
    ppl = module.evaluate([{"input_ids": w[None]} for w in data["evaluation"]])["ppl"]
    summary = compression_summary(module)
    row = {
        "method": args.one,
        "ppl": ppl,
        "seconds": seconds,
        "peak_mem_mib": peak,
        "peak_mem_compress_mib": peak_compress,
        "rss_before_compress_mib": rss_before,
        "weights_mib": weights_mib,
        "block_passes": passes,
        "n_blocks": len(find_blocks(module)[1]),
        "measured_C": summary.measured_C,
        "nominal_C": summary.nominal_C,
        "floor_seconds": floor,
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--cross-corpus", action="store_true", help="also calibrate on NEWS.txt")
    parser.add_argument("--peer", action="store_true", help="also run llm-compressor")
    parser.add_argument(
        "--shuffle-seed",
        type=shuffle_seed,
        nargs="+",
        default=None,
        help="permute the calibration windows with each seed ('none': original order); with "
        "several, the benchmark runs once per order and OUTPUT/spread.md gives the spread",
    )
    parser.add_argument("--output", default="outputs/bench")
    parser.add_argument(
        "--results",
        help="also write summary.json (every row, the ratios to the peer, the commit, the "
        "command, the load average) and README.md to this folder (docs/results/...)",
    )
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    out = Path(args.output)
    seeds = args.shuffle_seed or [None]
    if len(set(seeds)) != len(seeds):
        parser.error(f"--shuffle-seed {' '.join(map(order_name, seeds))}: repeated order")
    if len(seeds) == 1:
        args.shuffle_seed = seeds[0]
        load_before, state = os.getloadavg(), git_state()  # as the run starts
        rows, peer_rows = run_bench(args, out)
        write_report(out, rows, peer_rows, args)
        if args.results:
            write_results(Path(args.results), rows, peer_rows, args, load_before, state)
        return
    if args.results:
        parser.error("--results: one calibration order only (no several --shuffle-seed)")
    runs = {}
    for seed in seeds:  # the whole benchmark once per calibration order
        args.shuffle_seed = seed
        print(f"--- calibration order: {order_name(seed)}", flush=True)
        runs[order_name(seed)] = run_bench(args, out / f"order_{order_name(seed)}")
        write_report(out / f"order_{order_name(seed)}", *runs[order_name(seed)], args)
    text = spread_report(runs)
    write_text_atomic(out / "spread.md", text + "\n")
    write_text_atomic(out / "spread.json", json.dumps(runs, indent=2))
    print(text)


def git_state() -> dict[str, object]:
    """The commit the benchmark ran at and the tracked files that differed from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    changed = git("diff", "--name-only", "HEAD").splitlines()  # tracked files only
    return {"commit": git("rev-parse", "HEAD"), "modified": changed}


def ratios(rows: list[dict], peer_rows: list[dict], device: str) -> list[dict]:
    """Per method with a peer row: ours / the peer's compression time and memory, and
    ``time_passes``: the time ratio ours would have if compression cost nothing but its block
    passes (``block_passes`` of the floor's one pass each), the least an exact sequential
    method can reach."""
    ours = {r["method"]: r for r in rows}
    floor = next((r["floor_seconds"] for r in rows if r["floor_seconds"]), None)

    found = []
    for p in peer_rows:
        row = ours[p["ours"]]
        passes = row["block_passes"] / row["n_blocks"] * floor if floor else 0.0
        found.append(
            {
                "method": p["ours"],
                "time": row["seconds"] / p["seconds"],
                "time_passes": passes / p["seconds"] if passes else None,
                "memory": memory_use(row, device) / memory_use(p, device),
                "seconds_ours": row["seconds"],
                "seconds_peer": p["seconds"],
                "memory_mib_ours": memory_use(row, device),
                "memory_mib_peer": memory_use(p, device),
            }
        )
    return found


def write_results(
    folder: Path,
    rows: list[dict],
    peer_rows: list[dict],
    args: argparse.Namespace,
    load_before: tuple[float, float, float],
    state: dict[str, object],
) -> None:
    """``folder/summary.json`` (rows, peer rows, ratios, the commit and modified files of
    ``state``, taken as the run started, command, load averages) and a ``README.md`` naming the
    command and the commit."""
    command = "python scripts/bench_methods.py " + " ".join(sys.argv[1:])
    summary = {
        "command": command,
        **state,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "ratios": ratios(rows, peer_rows, args.device),
        "rows": rows,
        "peer": peer_rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    modified = ", ".join(state["modified"]) or "none"
    text = (
        "# SmolLM2: our methods against llm-compressor, time and compression memory\n\n"
        f"    {command}\n\n"
        f"Commit {state['commit']} (tracked files modified in the working tree: {modified}); "
        f"{summary['date']}; {summary['cpus']} CPUs; load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.1f}' for v in load_before)} before and "
        f"{', '.join(f'{v:.1f}' for v in summary['load_average_after'])} after. "
        "`summary.json` holds every row (ours: `rows`, llm-compressor's: `peer`) and, per "
        "method, ours / the peer's time and compression memory (`ratios`; `time_passes`: "
        "the time ratio of our block passes alone, each one floor pass, against the peer's "
        "whole time); `bench.md` the printed tables.\n"
    )
    write_text_atomic(folder / "README.md", text)
    write_text_atomic(folder / "bench.md", (Path(args.output) / "bench.md").read_text())
    print(f"results: {folder}")


def order_name(seed: int | None) -> str:
    return "none" if seed is None else str(seed)


def shuffle_seed(value: str) -> int | None:
    """``--shuffle-seed`` values: an integer seed, or ``none`` for the windows' own order."""
    if value == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shuffle-seed {value!r}: expected an integer seed or 'none' (original order)"
        ) from None


def run_bench(args: argparse.Namespace, out: Path) -> tuple[list[dict], list[dict]]:
    """Our methods (each in its own subprocess) and, with ``--peer``, llm-compressor's, on the
    windows written to ``out/data.pt``; returns ``(rows, peer_rows)``."""
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "data.pt"
    make_data(args, data_path)
    runs = list(args.methods)
    if args.cross_corpus:
        runs += [f"{m}@news" for m in CROSS_CORPUS if m in args.methods]
    rows = []
    base = [
        sys.executable,
        __file__,
        "--data",
        str(data_path),
        "--device",
        args.device,
        "--model",
        args.model,
        "--depth",
        str(args.depth),
    ]
    base += ["--random-weights"] if args.random_weights else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for method in runs:
        done = subprocess.run([*base, "--one", method], capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"{method:24s} ppl {rows[-1]['ppl']:10.3f}  {rows[-1]['seconds']:8.1f} s  "
            f"{rows[-1]['peak_mem_mib']:8.0f} MiB  passes {rows[-1]['block_passes']}",
            flush=True,
        )
    peer_rows = []
    peer_python = Path(".venv-peer/bin/python")
    if args.peer and peer_python.exists():
        for method in (m for m in args.methods if m in PEER):
            target = out / f"peer_{method}.json"
            cmd = [str(peer_python), "scripts/peer_llmcompressor.py", "--data", str(data_path)]
            cmd += [*PEER[method], "--device", args.device, "--out", str(target)]
            cmd += ["--depth", str(args.depth), "--model", args.model]
            cmd += ["--random-weights"] if args.random_weights else []
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"peer {method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = {
                "ours": method,
                "peer_args": " ".join(PEER[method]),
                **json.loads(target.read_text()),
            }
            peer_rows.append(row)
            print(f"peer {method}: ppl {row['ppl']:.3f}  {row['seconds']:.1f} s", flush=True)
    return rows, peer_rows


def spread_report(runs: dict[str, tuple[list[dict], list[dict]]]) -> str:
    """Perplexity per method over calibration orders: every value, mean and sample standard
    deviation, ours and llm-compressor's, and how often ours was at least as good (lower)."""
    orders = list(runs)
    lines = [
        f"perplexity over {len(orders)} orders of the same calibration windows "
        f"({', '.join(orders)}): float-level perturbations only",
        "",
        "| method | tool | ppl per order | mean | sd |",
        "|---|---|---|---|---|",
    ]
    summary = [
        "",
        "| method | mean ours - peer | ours <= peer | time ours / peer |",
        "|---|---|---|---|",
    ]
    methods = [r["method"] for r in runs[orders[0]][0]]
    for method in methods:
        ours = [next(r for r in runs[o][0] if r["method"] == method) for o in orders]
        peer = [next((p for p in runs[o][1] if p["ours"] == method), None) for o in orders]
        tools = [("ours", [r["ppl"] for r in ours])]
        if all(p is not None for p in peer):
            tools.append(("llm-compressor", [p["ppl"] for p in peer]))
        for tool, values in tools:
            mean, sd = _mean_sd(values)
            shown = " / ".join(f"{v:.3f}" for v in values)
            lines.append(f"| {method} | {tool} | {shown} | {mean:.3f} | {sd:.3f} |")
        if len(tools) == 2:
            diffs = [a - b for a, b in zip(tools[0][1], tools[1][1], strict=True)]
            wins = sum(d <= 0 for d in diffs)
            time_ratio = sum(r["seconds"] for r in ours) / sum(p["seconds"] for p in peer)
            mean, sd = _mean_sd(diffs)
            summary.append(
                f"| {method} | {mean:+.3f} (sd {sd:.3f}) | {wins} of {len(diffs)} | "
                f"{time_ratio:.2f}x |"
            )
    return "\n".join(lines + (summary if len(summary) > 3 else []))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def memory_use(row: dict, device: str) -> float:
    """What compression itself costs: CUDA's peak allocation, or on CPU the peak RSS during the
    call above the RSS before it (model loading's leftovers belong to neither tool)."""
    if device == "cpu":
        return max(row["peak_mem_compress_mib"] - row["rss_before_compress_mib"], 1.0)
    return row["peak_mem_mib"]


def write_report(out: Path, rows: list[dict], peer_rows: list[dict], args) -> None:
    floor = next((r["floor_seconds"] for r in rows if r["floor_seconds"]), None)
    lines = [
        f"model: {'random ' if args.random_weights else ''}{args.model} x{args.depth} depth,"
        f" device {args.device}, calibration {args.calibration_samples}x{args.seqlen}, "
        f"evaluation {args.eval_windows}x{args.seqlen} tokens",
        f"floor (one pass of every block over the calibration set): {floor:.2f} s" if floor else "",
        "",
        "| method | ppl | C nominal | C measured | time (s) | x floor | block passes |"
        " peak MiB: process / compression (weights) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        times_floor = f"{r['seconds'] / floor:.1f}" if floor and r["block_passes"] else "-"
        lines.append(
            f"| {r['method']} | {r['ppl']:.3f} | {r['nominal_C']:.2f} | "
            f"{r['measured_C']:.2f} | {r['seconds']:.1f} | {times_floor} | "
            f"{r['block_passes']} / {r['n_blocks']} | {r['peak_mem_mib']:.0f} / "
            f"{r['peak_mem_compress_mib'] or 0:.0f} ({r['weights_mib']:.0f}) |"
        )
    if peer_rows:
        ours = {r["method"]: r for r in rows}
        lines += [
            "",
            "| method | llm-compressor run (peer_llmcompressor.py) | ppl ours | ppl peer |"
            " time ours / peer | memory for compression ours / peer (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        for p in peer_rows:
            o = ours[p["ours"]]
            lines.append(
                f"| {p['ours']} | `{p['peer_args']}` | {o['ppl']:.3f} | {p['ppl']:.3f} | "
                f"{o['seconds']:.1f} / {p['seconds']:.1f} = "
                f"{o['seconds'] / p['seconds']:.2f}x | {memory_use(o, args.device):.0f} / "
                f"{memory_use(p, args.device):.0f} = "
                f"{memory_use(o, args.device) / memory_use(p, args.device):.2f}x |"
            )
    text = "\n".join(lines)
    write_text_atomic(out / "bench.md", text + "\n")
    write_text_atomic(out / "bench.json", json.dumps({"rows": rows, "peer": peer_rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
