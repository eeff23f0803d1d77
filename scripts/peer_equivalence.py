"""Are our GPTQ weights the ones llm-compressor computes? A layer-by-layer comparison.

    python scripts/peer_equivalence.py                       # tiny random Llama (seconds)
    python scripts/peer_equivalence.py --model smollm2-135m --layers 3 --samples 8

Builds the model (a tiny Llama from a config, or the first ``--layers`` blocks of a real one),
saves it with the calibration windows to a temporary folder, compresses it with our ``GPTQ``
(4-bit, asymmetric, per channel, no activation ordering, damping 0.01, block 128) in this process
and with llm-compressor's ``GPTQModifier`` (same settings; run by the peer virtualenv's python,
``--peer-python``, see ``scripts/peer_llmcompressor.py``), and prints, per layer, the share of
weights that differ, the largest difference, and how far apart the two Hessians are (relative
Frobenius norm after scaling to equal trace: llm-compressor divides by sequences, we by
tokens); per block, how far apart the calibration inputs the block received are (relative norm
over all windows). Needs ``.venv-peer`` (``pip install llmcompressor`` in a separate
virtualenv).

On SmolLM2 this shows where GPTQ's chaos starts: block 0's Hessians agree to float32 rounding
and its weights differ only by rounding flips at near-ties, yet block 1's inputs already differ
by ~0.4 % (the flips sit in columns fed by massive activations) and later blocks' weights by
3-20 %.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PEER = """
import sys, torch, transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
import llmcompressor.modifiers.gptq.base as base
folder = sys.argv[1]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
calib = torch.load(folder + "/calibration.pt", weights_only=True)
names = {m: n for n, m in model.named_modules()}
hessians, inputs = {}, {}
prepare = base.prepare_batch
def record_hessians(batch, qparams, hs, counts):
    for m in batch:
        hessians[names[m]] = hs[m] / counts[m]
    return prepare(batch, qparams, hs, counts)
base.prepare_batch = record_hessians
def recorder(i):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen = inputs.setdefault(i, [])
        if x.device.type != "meta" and len(seen) < len(calib):  # not tracing; calibration pass
            seen.append(x.detach().clone())
    return hook
for i, layer in enumerate(model.model.layers):
    layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
data = Dataset.from_dict({"input_ids": calib.tolist(),
                          "attention_mask": torch.ones_like(calib).tolist()})
weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}
recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                      ignore=["lm_head"], actorder=None, dampening_frac=0.01, block_size=128)
model = oneshot(model=model, tokenizer=transformers.ByT5Tokenizer(), recipe=recipe, dataset=data,
                num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
                shuffle_calibration_samples=False)
torch.save({k: v for k, v in model.state_dict().items() if k.endswith("proj.weight")},
           folder + "/peer.pt")
torch.save({"hessians": hessians, "inputs": inputs}, folder + "/peer_statistics.pt")
"""

TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "tie_word_embeddings": True,
}


def build(args: argparse.Namespace, folder: Path) -> torch.Tensor:
    """Save the model to compare into ``folder``; return the calibration windows."""
    import transformers

    from ppq_lightning.models import CausalLMModule

    generator = torch.Generator().manual_seed(0)
    if args.model == "tiny":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
        calibration = torch.randint(0, TINY["vocab_size"], (args.samples, 64), generator=generator)
    else:
        from ppq_lightning.datamodules import TextDataModule

        model = CausalLMModule(model=args.model).model
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        model.hf_quantizer, model.config.quantization_config = None, None  # GGUF-dequantized
        data = TextDataModule(tokenizer=args.model, num_calibration_samples=args.samples)
        data.setup("fit")
        calibration = data.calibration_windows()
    model.save_pretrained(folder)
    torch.save(calibration, folder / "calibration.pt")
    return calibration


def ours(folder: Path, calibration: torch.Tensor) -> tuple[dict, dict, dict]:
    """Our GPTQ weights, the Hessian each layer was solved with, and each block's inputs."""
    import transformers

    from ppq_lightning.callbacks import GPTQ
    from ppq_lightning.models import CausalLMModule

    hessians: dict[str, torch.Tensor] = {}
    inputs: dict[int, list[torch.Tensor]] = {}

    class RecordingGPTQ(GPTQ):
        def compress_layer(self, name, layer, statistic):
            hessians[name.removeprefix("model.")] = statistic.clone()
            return super().compress_layer(name, layer, statistic)

    def recorder(i: int):
        def hook(module, args, kwargs):
            seen = inputs.setdefault(i, [])
            if len(seen) < len(calibration):  # the statistics pass (then the re-run)
                seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        return hook

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
    module = CausalLMModule.from_model(model.eval())
    stage = RecordingGPTQ(bits=4, num_calibration_batches=len(calibration), log_layers=False)
    stage.apply(module, dataloader=[{"input_ids": w[None]} for w in calibration])
    weights = {
        k: v.detach() for k, v in module.model.named_parameters() if k.endswith("proj.weight")
    }
    return weights, hessians, inputs


def relative_difference(a: torch.Tensor, b: torch.Tensor, equal_trace: bool = False) -> float:
    """``||a - b|| / ||b||`` in float64; with ``equal_trace``, ``a`` is first scaled to ``b``'s
    trace (Hessians normalised by different counts)."""
    a, b = a.double(), b.double()
    if equal_trace:
        a = a * (b.trace() / a.trace())
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m or a HF folder/id")
    parser.add_argument("--layers", type=int, default=3, help="blocks kept of a real model")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--peer-python", default=".venv-peer/bin/python")
    args = parser.parse_args()
    if not Path(args.peer_python).exists():
        sys.exit(f"--peer-python {args.peer_python} not found: see scripts/peer_llmcompressor.py")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calibration = build(args, folder)
        mine, my_hessians, my_inputs = ours(folder, calibration)
        subprocess.run([args.peer_python, "-c", PEER, str(folder)], check=True)
        peer = torch.load(folder / "peer.pt", weights_only=True)
        statistics = torch.load(folder / "peer_statistics.pt", weights_only=True)
    print(f"{'layer':45s} {'differing':>10s} {'max |diff|':>11s} {'H rel. diff':>12s}")
    for name, weight in mine.items():
        diff = (weight - peer[name].float()).abs()
        layer = name.removesuffix(".weight")
        h = relative_difference(my_hessians[layer], statistics["hessians"][layer], True)
        print(
            f"{name:45s} {(diff > 1e-6).float().mean().item():10.5%} "
            f"{diff.max().item():11.3g} {h:12.2e}"
        )
    print(f"\n{'block':6s} {'inputs rel. diff':>17s}")
    for index, theirs in sorted(statistics["inputs"].items()):
        a, b = torch.cat(my_inputs[index]), torch.cat(theirs)
        print(f"{index:<6d} {relative_difference(a, b):17.2e}")


if __name__ == "__main__":
    main()
