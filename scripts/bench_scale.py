"""RTN, Wanda and GPTQ on random-weight models of real shapes, with the weights on disk.

Issue #28 (points 6 and 7). The script writes random-weight Llama models in bf16 as safetensors
(one shard per block, written in chunks: the writer never holds more than a chunk of a tensor)
with a ``config.json`` that transformers reads:

- ``8b``: Llama-3-8B's shape (32 blocks, hidden 4096, MLP 14336, 32 query / 8 key-value heads,
  vocabulary 128256, rope theta 500000; about 16 GB). ``--blocks N`` keeps fewer blocks of
  the same width, for quick runs.
- ``70b``: two blocks of Llama-3-70B's shape (hidden 8192, MLP 28672, 64 / 8 heads, the same
  vocabulary) for per-block figures (two, not one: ``calibration.blocks.find_block_chain``
  finds no chain in a model with a single decoder layer, which would then be calibrated and
  evaluated whole, not block by block).

Then each method runs in its own child process (so its peak memory is its own) through the
ordinary callbacks on ``CausalLMModule(model=folder, dtype="bfloat16", offload_folder=...)``,
that is with the weights memory-mapped from disk (``ppq_lightning.modules.offload``): a
Lightning ``Trainer.validate`` with the callback and a datamodule that gives calibration and
evaluation windows of random token ids (the callback compresses at the start of validation,
then the windows are evaluated, each block's pages released after its forward). Each child
reports:

- peak resident memory (``ru_maxrss``) against the model's bytes on disk, and the peaks of
  ``RssAnon`` and ``RssFile`` (``/proc/self/status``, sampled) per phase (load, stage,
  evaluation, floor);
- seconds per block against the floor: one block's forward pass over the calibration set,
  measured afterwards in the same process on the stage's first ``--floor-blocks`` blocks (for
  GPTQ also the pass with the Hessians accumulated, and the solve, which the stage's per-layer
  metrics time); ``floor_seconds_per_block`` is the engine's block passes per block times
  the pass, plus for GPTQ the accumulation and the solve;
- the share of the stage's time spent reading and writing weights
  (``modules.offload.disk_weights(model).traffic``) and the most tensor bytes materialized at
  once;
- the evaluation perplexity (random weights: the number is meaningless, its memory and time
  are not).

``--device cuda`` (point 7): the weights stay on the CPU (mapped from disk), the calibrated
stages run one block on the GPU (``device="cuda"``), the evaluation streams each block to the
GPU for its forward (``offload.stream_blocks(..., device="cuda")``), and the report adds
``torch.cuda.max_memory_allocated`` of the stage and of the evaluation. RTN has no device
argument: it rounds layer by layer on the CPU. Without CUDA the script stops before writing
anything.

``--output DIR`` writes ``DIR/<shape>.json`` per shape (the command, the git commit, the
machine and its load, the shape, the model's bytes on disk, and every method's report).

Block checkpoints (``block_checkpoints``, on by default under a Trainer) are off here unless
``--block-checkpoints``: they would write every block's state once more (about the model's size
again on disk).

Usage::

    python scripts/bench_scale.py --shapes 8b --blocks 2 --methods rtn wanda gptq
    python scripts/bench_scale.py --shapes 8b 70b --methods rtn wanda gptq --gptq-blocks 2 \\
        --calibration 8x512 --eval-windows 2 --output docs/results/scale_llama3_8b
    python scripts/bench_scale.py --shapes 8b --methods gptq --gptq-blocks 32 \\
        --calibration 512x2048 --eval-windows 0 --device cuda     # llm-compressor's setting
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB = 128256
ROPE_THETA = 500000.0
SHAPES: dict[str, dict[str, int]] = {
    "8b": {"hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "blocks": 32, "vocab": VOCAB},
    # two blocks: the calibration engine finds a chain of blocks only where two are repeated
    "70b": {"hidden": 8192, "mlp": 28672, "heads": 64, "kv_heads": 8, "blocks": 2, "vocab": VOCAB},
    # for tests: the same code path in seconds
    "tiny": {"hidden": 128, "mlp": 256, "heads": 4, "kv_heads": 2, "blocks": 2, "vocab": 256},
}
METHODS = ("rtn", "wanda", "gptq")
CHUNK = 1 << 24  # elements generated and written at a time (32 MiB of bf16)


# -- arguments ----------------------------------------------------------------------------------
def calibration_shape(text: str) -> tuple[int, int]:
    """``"8x512"`` -> ``(8, 512)``: windows x tokens.

    Raises:
        argparse.ArgumentTypeError: on anything else.
    """
    try:
        windows, tokens = (int(part) for part in text.lower().split("x"))
    except ValueError:
        windows = tokens = 0
    if windows < 1 or tokens < 2:
        raise argparse.ArgumentTypeError(
            f"--calibration {text!r}: expected WINDOWSxTOKENS with positive integers, e.g. 8x512"
        )
    return windows, tokens


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["8b", "70b"])
    parser.add_argument("--blocks", type=int, default=None, help="blocks of the 8b shape")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--gptq-blocks", type=int, default=2, help="GPTQ compresses only the first N blocks"
    )
    parser.add_argument("--calibration", type=calibration_shape, default=(8, 512))
    parser.add_argument(
        "--eval-windows", type=int, default=2, help="evaluation windows (0: no evaluation)"
    )
    parser.add_argument(
        "--eval-seqlen", type=int, default=None, help="tokens per window (default: calibration's)"
    )
    parser.add_argument("--floor-blocks", type=int, default=2, help="blocks the floor is timed on")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--block-checkpoints", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_scale")
    parser.add_argument(
        "--keep-models", action="store_true", help="keep the written models (deleted otherwise)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=None, help="report folder: one <shape>.json per shape"
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("gptq_blocks", "floor_blocks"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.blocks is not None and args.blocks < 2:  # one decoder layer is no chain of blocks
        parser.error(f"--blocks must be at least 2 (a chain of blocks), got {args.blocks}")
    if args.eval_windows < 0:
        parser.error(f"--eval-windows must be 0 or more, got {args.eval_windows}")
    if args.eval_seqlen is not None and args.eval_seqlen < 2:
        parser.error(f"--eval-seqlen must be at least 2, got {args.eval_seqlen}")
    return args


def check_device(device: str) -> None:
    """Stop, before anything is written, when ``device`` is CUDA and CUDA is unavailable.

    Raises:
        SystemExit: naming ``--device`` and what to do.
    """
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: CUDA is not available on this machine (torch.cuda.is_available() "
            f"is False; torch {torch.__version__}, built for CUDA {torch.version.cuda}): run "
            "it where a GPU is, or use --device cpu. Nothing was written."
        )


def shape_of(name: str, blocks: int | None) -> dict[str, int]:
    """The shape ``name`` (``SHAPES``), with ``blocks`` blocks for the 8b shape when given."""
    shape = dict(SHAPES[name])
    if blocks is not None and name != "70b":
        shape["blocks"] = blocks
    return shape


# -- writing a model ----------------------------------------------------------------------------
def llama_config(shape: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of a Llama-3 model of ``shape`` (bf16, untied head)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["blocks"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=8192,
        rope_theta=ROPE_THETA,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=min(128000, shape["vocab"] - 2),
        eos_token_id=min(128001, shape["vocab"] - 1),
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    return config.to_dict()


def block_tensors(shape: dict[str, int], index: int) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes of block ``index``'s tensors (``LlamaDecoderLayer``)."""
    h, m = shape["hidden"], shape["mlp"]
    head_dim = h // shape["heads"]
    q, kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    prefix = f"model.layers.{index}."
    return [
        (prefix + "input_layernorm.weight", (h,)),
        (prefix + "self_attn.q_proj.weight", (q, h)),
        (prefix + "self_attn.k_proj.weight", (kv, h)),
        (prefix + "self_attn.v_proj.weight", (kv, h)),
        (prefix + "self_attn.o_proj.weight", (h, q)),
        (prefix + "post_attention_layernorm.weight", (h,)),
        (prefix + "mlp.gate_proj.weight", (m, h)),
        (prefix + "mlp.up_proj.weight", (m, h)),
        (prefix + "mlp.down_proj.weight", (h, m)),
    ]


def shards(shape: dict[str, int]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """``{file name: [(tensor name, shape)]}``: the embedding, one file per block, the head."""
    h, v = shape["hidden"], shape["vocab"]
    files = {"model-embed.safetensors": [("model.embed_tokens.weight", (v, h))]}
    for index in range(shape["blocks"]):
        files[f"model-block-{index:05d}.safetensors"] = block_tensors(shape, index)
    files["model-head.safetensors"] = [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return files


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Write bf16 tensors to the safetensors file ``path`` chunk by chunk: norms are ones, the
    rest normal with standard deviation 0.02 (Llama's initializer range). Returns its bytes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        size = math.prod(dims) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_name("." + path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, dims in tensors:
            count = math.prod(dims)
            for start in range(0, count, CHUNK):
                n = min(CHUNK, count - start)
                if name.endswith("norm.weight"):
                    chunk = torch.ones(n, dtype=torch.bfloat16)
                else:
                    chunk = (torch.randn(n, generator=generator) * 0.02).to(torch.bfloat16)
                handle.write(chunk.view(torch.int16).numpy().tobytes())
    os.replace(partial, path)
    return 8 + len(encoded) + offset


def write_model(folder: Path, shape: dict[str, int], seed: int) -> dict[str, Any]:
    """Write a random-weight model of ``shape`` to ``folder`` (kept when a complete one of the
    same config and seed is there). Returns its bytes on disk and the seconds spent writing."""
    config = llama_config(shape)
    stamp = json.loads(json.dumps({"config": config, "seed": seed}))  # as read back
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        return {"bytes_on_disk": size, "write_seconds": None, "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    weight_map, size = {}, 0
    for number, (file_name, tensors) in enumerate(shards(shape).items()):
        size += write_safetensors(folder / file_name, tensors, seed * 100003 + number)
        weight_map.update({name: file_name for name, _ in tensors})
        print(f"  wrote {file_name} ({size / 2**30:.1f} GiB so far)", flush=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    done.write_text(json.dumps(stamp))
    return {"bytes_on_disk": size, "write_seconds": time.perf_counter() - start, "reused": False}


# -- the child: one method --------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in bytes (``/proc/self/status``)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def mapped_file_rss(least: int = 1 << 24) -> dict[str, int]:
    """Resident bytes of each memory-mapped ``*.safetensors`` file holding at least ``least``
    of them (``/proc/self/smaps``): which weights are in memory."""
    rss: dict[str, int] = {}
    current = None
    with open("/proc/self/smaps") as handle:
        for text in handle:
            parts = text.split()
            if "-" in parts[0] and ":" not in parts[0]:
                current = parts[5] if len(parts) > 5 and parts[5].endswith(".safetensors") else None
            elif parts[0] == "Rss:" and current is not None:
                name = f"{Path(current).parent.name}/{Path(current).name}"
                rss[name] = rss.get(name, 0) + int(parts[1]) * 1024
    return {name: size for name, size in rss.items() if size >= least}


class MemorySampler(threading.Thread):
    """The largest VmRSS, RssAnon and RssFile seen per phase (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "load"
        self.peaks: dict[str, dict[str, int]] = {}
        self.stopped = threading.Event()
        self.files_at_end: dict[str, dict[str, int]] = {}  # mapped files resident, per phase

    def sample(self) -> None:
        status = proc_status()
        peaks = self.peaks.setdefault(self.phase, {})
        for key in ("VmRSS", "RssAnon", "RssFile"):
            peaks[key] = max(peaks.get(key, 0), status.get(key, 0))

    def enter(self, phase: str) -> None:
        self.sample()
        self.files_at_end[self.phase] = mapped_file_rss()
        self.phase = phase
        self.sample()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()


def make_stage(method: str, args: argparse.Namespace, blocks: int) -> Any:
    """The callback of ``method``: RTN W4 g128, Wanda 50 %, GPTQ W4 g128 on the first
    ``--gptq-blocks`` blocks (a targets regex); the grids symmetric, as llm-compressor's
    W4A16 scheme."""
    from ppq_lightning.callbacks import GPTQ, RTNQuantization, Wanda
    from ppq_lightning.errors import PPQConfigError

    windows = args.calibration[0]
    device = args.device if args.device == "cuda" else None
    calibrated = {"num_calibration_batches": windows, "device": device}
    if method == "rtn":
        return RTNQuantization(bits=4, group_size=128, symmetric=True)
    first = min(args.gptq_blocks, blocks)
    targets = None if first >= blocks else rf"\.layers\.({'|'.join(map(str, range(first)))})\."

    def build(**extra: Any) -> Any:
        if method == "wanda":
            return Wanda(sparsity=0.5, **calibrated, **extra)
        return GPTQ(bits=4, group_size=128, symmetric=True, targets=targets, **calibrated, **extra)

    try:
        return build(block_checkpoints=args.block_checkpoints)
    except PPQConfigError as error:  # a version of the stages without block checkpoints
        if args.block_checkpoints or "block_checkpoints" not in str(error):
            raise
        return build()


def random_windows(vocab: int, windows: int, tokens: int, seed: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (tokens,), generator=generator) for _ in range(windows)]


def measure_floor(
    module: Any, batches: list[Any], blocks: int, device: str, hessian: bool
) -> dict[str, Any]:
    """One block forward over the calibration set (and with ``hessian``, the same with every
    target's Hessian accumulated), on the first ``blocks`` blocks, each copied to ``device``
    (not timed) as the stage holds it."""
    import torch
    from torch import nn

    from ppq_lightning.calibration.blocks import find_block_chain
    from ppq_lightning.calibration.capture import (
        capture_block_inputs,
        evaluating,
        first_output,
        no_cache,
    )
    from ppq_lightning.calibration.data import default_forward
    from ppq_lightning.calibration.engine import observing
    from ppq_lightning.calibration.statistics import LayerStatistics
    from ppq_lightning.modules.offload import disk_weights

    store = disk_weights(module)
    chain = find_block_chain(module)
    run_on = torch.device(device)

    def sync() -> None:
        if run_on.type == "cuda":
            torch.cuda.synchronize()

    passes, hessians = [], []
    with torch.no_grad(), no_cache(module), evaluating(module):
        inputs = capture_block_inputs(module, chain.blocks[0], batches, default_forward)
        args = [tuple(_to(a, run_on)) for a in inputs.args]
        kwargs = [_to(kw, run_on) for kw in inputs.kwargs]
        for index in range(min(blocks, len(chain.blocks))):
            block = chain.blocks[index]
            with store.materialized(block, run_on, write=False):
                if hessian:
                    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
                    statistics = LayerStatistics("hessian", "float32")
                    sync()
                    start = time.perf_counter()
                    with observing(layers, statistics.observe):
                        for k in range(len(args)):
                            block(*args[k], **kwargs[k])
                    sync()
                    hessians.append(time.perf_counter() - start)
                    del statistics
                sync()
                start = time.perf_counter()
                for k in range(len(args)):
                    out = first_output(block(*args[k], **kwargs[k]))
                    args[k] = (out, *args[k][1:])
                sync()
                passes.append(time.perf_counter() - start)
            store.release(block)
    report: dict[str, Any] = {"floor_blocks": len(passes), "pass_seconds": passes}
    report["pass_seconds_mean"] = sum(passes) / len(passes)
    if hessian:
        accumulation = [h - p for h, p in zip(hessians, passes, strict=True)]
        report["pass_with_hessians_seconds"] = hessians
        report["hessian_seconds_mean"] = max(0.0, sum(accumulation) / len(accumulation))
    return report


def _to(value: Any, device: Any) -> Any:
    from lightning.pytorch.utilities import move_data_to_device

    return move_data_to_device(value, device)


def child(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from ppq_lightning.calibration.blocks import find_block_chain
    from ppq_lightning.models import CausalLMModule
    from ppq_lightning.modules.offload import disk_weights, stream_blocks

    torch.set_num_threads(os.cpu_count() or 1)
    sampler = MemorySampler()
    sampler.start()
    work = Path(tempfile.mkdtemp(prefix=f"{args.method}-", dir=args.workdir))
    try:
        cuda = args.device == "cuda"
        start = time.perf_counter()
        module = CausalLMModule(
            model=str(args.model_dir), dtype="bfloat16", offload_folder=str(work / "offload")
        )
        load_seconds = time.perf_counter() - start
        store = disk_weights(module.model)
        config = module.model.config
        blocks = config.num_hidden_layers
        windows, tokens = args.calibration
        calibration = random_windows(config.vocab_size, windows, tokens, args.seed)
        eval_seqlen = args.eval_seqlen or tokens
        evaluation = random_windows(
            config.vocab_size, args.eval_windows, eval_seqlen, args.seed + 1
        )
        stage = make_stage(args.method, args, blocks)
        chain = find_block_chain(module)
        first_call: dict[int, float] = {}

        def pre_hook(index: int) -> Any:
            def hook(*_: Any) -> None:
                first_call.setdefault(index, time.perf_counter())

            return hook

        handles = [b.register_forward_pre_hook(pre_hook(i)) for i, b in enumerate(chain.blocks)]
        timing: dict[str, float] = {}

        class Phases(L.Callback):
            """Marks the phases: the stage fires in ``on_validation_start`` (an earlier
            callback), the evaluation follows."""

            def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
                timing["stage_end"] = time.perf_counter()
                for handle in handles:
                    handle.remove()
                if cuda:
                    timing["stage_cuda_peak"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    stream_blocks(chain.blocks, device="cuda")
                sampler.enter("evaluation")

            def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
                timing["evaluation_end"] = time.perf_counter()

        class Windows(L.LightningDataModule):
            def calibration_dataloader(self) -> DataLoader:
                return DataLoader(calibration, batch_size=1)

            def val_dataloader(self) -> DataLoader:
                return DataLoader(evaluation, batch_size=1)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sampler.enter("stage")
        timing["stage_start"] = time.perf_counter()
        metrics: dict[str, float] = {}
        if args.eval_windows:
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=str(work),
                callbacks=[stage, Phases()],
            )
            (result,) = trainer.validate(module, datamodule=Windows(), verbose=False)
            metrics = {k: float(v) for k, v in result.items()}
        else:  # no evaluation: the Trainer would skip validation, and the stage with it
            stage.apply(module, dataloader=[w.unsqueeze(0) for w in calibration])
            Phases().on_validation_start(None, module)
            timing["evaluation_end"] = time.perf_counter()
        sampler.enter("floor")
        traffic = dict(vars(store.traffic))
        floor_blocks = min(args.floor_blocks, blocks)
        if args.method == "gptq":
            floor_blocks = min(floor_blocks, args.gptq_blocks)
        floor = measure_floor(
            module,
            [w.unsqueeze(0) for w in calibration],
            floor_blocks,
            args.device,
            hessian=args.method == "gptq",
        )
        sampler.enter("end")
        sampler.stopped.set()
        result = stage.result
        stage_seconds = result.seconds
        layers = result.layers
        walked = len(
            {name.split(".layers.")[1].split(".")[0] for name in layers if ".layers." in name}
        )
        report = stage.calibration_report if hasattr(stage, "calibration_report") else None
        per_block = stage_seconds / max(walked, 1)
        starts = [first_call[i] for i in sorted(first_call)]
        block_seconds = [b - a for a, b in itertools.pairwise(starts)]
        if starts and len(starts) == walked:
            block_seconds.append(timing["stage_end"] - starts[-1])
        passes_per_block = report.block_passes / report.n_blocks if report else 0.0
        floor_per_block = passes_per_block * floor["pass_seconds_mean"]
        solve = None
        if args.method == "gptq":
            solve = sum(v.get("seconds", 0.0) for v in layers.values()) / max(walked, 1)
            floor_per_block += floor["hessian_seconds_mean"] + solve
        io_seconds = traffic["read_seconds"] + traffic["write_seconds"]
        out = {
            "method": args.method,
            "device": args.device,
            "blocks": blocks,
            "blocks_compressed": walked,
            "layers_compressed": len(layers),
            "calibration": f"{windows}x{tokens}",
            "evaluation": f"{args.eval_windows}x{eval_seqlen}",
            "load_seconds": load_seconds,
            "stage_seconds": stage_seconds,
            "stage_wall_seconds": timing["stage_end"] - timing["stage_start"],
            "evaluation_seconds": timing["evaluation_end"] - timing["stage_end"],
            "seconds_per_block": per_block,
            "block_seconds": block_seconds,
            "block_passes": report.block_passes if report else 0,
            "capture_passes": report.capture_passes if report else 0,
            "passes_per_block": passes_per_block,
            "solve_seconds_per_block": solve,
            "floor": floor,
            "floor_seconds_per_block": floor_per_block,
            "x_floor": per_block / floor_per_block if floor_per_block else None,
            "x_pass": per_block / floor["pass_seconds_mean"],
            "traffic": traffic,
            "io_seconds": io_seconds,
            "io_share": io_seconds / stage_seconds if stage_seconds else None,
            "ppl": metrics.get("val/ppl"),
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory_peaks": sampler.peaks,
            "mapped_files_resident_at_phase_end": sampler.files_at_end,
            "cuda_max_memory_allocated_stage": timing.get("stage_cuda_peak"),
            "cuda_max_memory_allocated_evaluation": (
                torch.cuda.max_memory_allocated() if cuda else None
            ),
            "cuda_device": torch.cuda.get_device_name() if cuda else None,
            "threads": torch.get_num_threads(),
        }
        args.child.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the parent -----------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return found.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """CPU cores, memory, load and the CPU's bf16 support, as this run saw them."""
    info: dict[str, Any] = {"cpu_cores": os.cpu_count(), "platform": platform.platform()}
    try:
        flags = Path("/proc/cpuinfo").read_text()
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
        memory = Path("/proc/meminfo").read_text().splitlines()
        info["memory_total_bytes"] = int(memory[0].split()[1]) * 1024
    except OSError:
        pass
    info["load_average_at_start"] = os.getloadavg()
    return info


def run_child(args: argparse.Namespace, method: str, folder: Path, out: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--child={out}",
        f"--method={method}",
        f"--model-dir={folder}",
        f"--calibration={args.calibration[0]}x{args.calibration[1]}",
        f"--eval-windows={args.eval_windows}",
        f"--floor-blocks={args.floor_blocks}",
        f"--gptq-blocks={args.gptq_blocks}",
        f"--device={args.device}",
        f"--workdir={args.workdir}",
        f"--seed={args.seed}",
    ]
    if args.eval_seqlen is not None:
        command.append(f"--eval-seqlen={args.eval_seqlen}")
    if args.block_checkpoints:
        command.append("--block-checkpoints")
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def line(shape: str, size: int, r: dict[str, Any]) -> str:
    gib = 2**30
    cuda = r["cuda_max_memory_allocated_stage"]
    floor = (
        f"{r['x_floor']:.2f}x the floor {r['floor_seconds_per_block']:.1f} s"
        if r["x_floor"] is not None
        else f"{r['x_pass']:.2f}x one block pass; no pass is its floor"
    )
    return (
        f"{shape:>4} {r['method']:>5}: peak RSS {r['ru_maxrss_bytes'] / gib:.2f} GiB "
        f"(model {size / gib:.1f} GiB on disk), {r['seconds_per_block']:.2f} s/block ({floor}), "
        f"I/O {100 * (r['io_share'] or 0):.0f} % of {r['stage_seconds']:.1f} s, "
        f"ppl {r['ppl']}" + (f", GPU peak {cuda / gib:.2f} GiB" if cuda is not None else "")
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.child is not None:
        child(args)
        return {}
    check_device(args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/bench_scale.py", *(argv or sys.argv[1:])]),
        "commit": _git_commit(),
        "machine": machine(),
        "device": args.device,
        "calibration": f"{args.calibration[0]}x{args.calibration[1]}",
        "gptq_blocks": args.gptq_blocks,
        "settings": {
            "rtn": "RTNQuantization(bits=4, group_size=128, symmetric=True)",
            "wanda": "Wanda(sparsity=0.5)",
            "gptq": "GPTQ(bits=4, group_size=128, symmetric=True), on the first "
            f"{args.gptq_blocks} block(s)",
            "block_checkpoints": args.block_checkpoints,
        },
        "shapes": {},
    }
    for name in args.shapes:
        shape = shape_of(name, args.blocks)
        folder = args.workdir / f"llama3-{name}-{shape['blocks']}blocks"
        print(f"{name}: writing {folder} ...", flush=True)
        written = write_model(folder, shape, args.seed)
        results = {}
        try:
            for method in args.methods:
                print(f"{name}: {method} ...", flush=True)
                out = args.workdir / f"{name}-{method}.json"
                results[method] = run_child(args, method, folder, out)
                results[method]["peak_rss_over_model_bytes"] = (
                    results[method]["ru_maxrss_bytes"] / written["bytes_on_disk"]
                )
                print(line(name, written["bytes_on_disk"], results[method]), flush=True)
        finally:
            if not args.keep_models:
                shutil.rmtree(folder, ignore_errors=True)
        summary["shapes"][name] = {"shape": shape, **written, "methods": results}
        if args.output is not None:  # one file per shape: runs of other shapes keep theirs
            from ppq_lightning.reports import write_json

            report = {**summary, "shapes": {name: summary["shapes"][name]}}
            write_json(args.output / f"{name}.json", report)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
