"""Reloading exports in a fresh Python process, as a user's runtime would (no ppq state)."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import save_file
jobs, ids, out = json.loads(sys.argv[1]), torch.load(sys.argv[2], weights_only=True), sys.argv[3]
results, errors = {}, {}
for label, (folder, mode) in jobs.items():
    try:
        if mode == "transformers":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        elif mode == "transformers-bfloat16":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        elif mode == "dequantize":
            from transformers import AutoModelForCausalLM, CompressedTensorsConfig
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32,
                quantization_config=CompressedTensorsConfig(dequantize=True))
        elif mode == "gguf":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file="model.gguf", dtype=torch.float32)
        elif mode == "load_pretrained":
            from ppq_lightning.export import load_pretrained
            model = load_pretrained(folder)
        elif mode == "peft":
            from peft import PeftModel
            from ppq_lightning.export import load_pretrained
            base = load_pretrained(folder + "/base")
            model = PeftModel.from_pretrained(base, folder + "/adapter")
        with torch.no_grad():
            results[label] = model(ids).logits.float().contiguous()
    except Exception as err:
        errors[label] = f"{type(err).__name__}: {str(err)[:300]}"
save_file(results, out)
print("ERRORS" + json.dumps(errors))
"""


def fresh_logits(tmp_path, jobs: dict, ids: torch.Tensor) -> tuple[dict, dict]:
    """Logits of ``jobs`` (label -> (folder, mode)) on ``ids``, computed in a new process;
    and the errors (label -> message) of the jobs that failed to load."""
    ids_file, out = tmp_path / "ids.pt", tmp_path / "logits.safetensors"
    torch.save(ids, ids_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    jobs = {k: (str(f), m) for k, (f, m) in jobs.items()}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(jobs), str(ids_file), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("ERRORS"))
    return load_file(str(out)), json.loads(line[len("ERRORS") :])
