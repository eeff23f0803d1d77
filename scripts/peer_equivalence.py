"""Are our GPTQ weights the ones llm-compressor computes? A layer-by-layer comparison.

    python scripts/peer_equivalence.py                       # tiny random Llama (seconds)
    python scripts/peer_equivalence.py --model smollm2-135m --layers 3 --samples 8

Builds the model (a tiny Llama from a config, or the first ``--layers`` blocks of a real one),
saves it with the calibration windows to a temporary folder, compresses it with our ``GPTQ``
(4-bit, asymmetric, per channel, no activation ordering, damping 0.01, block 128) in this process
and with llm-compressor's ``GPTQModifier`` (same settings; run by the peer virtualenv's python,
``--peer-python``, see ``scripts/peer_llmcompressor.py``), and prints, per layer, the share of
weights that differ and the largest difference. Needs ``.venv-peer`` (``pip install
llmcompressor`` in a separate virtualenv).
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
folder = sys.argv[1]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
calib = torch.load(folder + "/calibration.pt")
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

    from ppq_lightning.lm import CausalLMModule

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


def ours(folder: Path, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    import transformers

    from ppq_lightning.callbacks import GPTQ
    from ppq_lightning.lm import CausalLMModule

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    module = CausalLMModule.from_model(model.eval())
    stage = GPTQ(bits=4, num_calibration_batches=len(calibration), log_layers=False)
    stage.apply(module, dataloader=[{"input_ids": w[None]} for w in calibration])
    return {k: v.detach() for k, v in module.model.named_parameters() if k.endswith("proj.weight")}


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
        mine = ours(folder, calibration)
        subprocess.run([args.peer_python, "-c", PEER, str(folder)], check=True)
        peer = torch.load(folder / "peer.pt")
    print(f"{'layer':45s} {'differing':>10s} {'max |diff|':>11s}")
    for name, weight in mine.items():
        diff = (weight - peer[name].float()).abs()
        print(f"{name:45s} {(diff > 1e-6).float().mean().item():10.5%} {diff.max().item():11.3g}")


if __name__ == "__main__":
    main()
