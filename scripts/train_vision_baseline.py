"""Train the offline vision model the package ships: a ResNet-18 (widths 16-128, 3x3 stem) on
Fashion-MNIST, on the CPU in a few minutes.

The architecture is the one ``ImageClassifierModule(model="fashion-mnist-resnet18")`` builds
(``ppq_lightning.models.vision.BUILTIN``); the data is Debian's ``dataset-fashion-mnist`` (or
torchvision's download). The weights go to a safetensors file with the test accuracy and the
command in its metadata, and a JSON report beside it.

    python scripts/train_vision_baseline.py --epochs 4
    python scripts/train_vision_baseline.py --epochs 1 --output /tmp/quick.safetensors
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save

from ppq_lightning.datamodules import VisionDataModule
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.models.vision import ASSETS, BUILTIN
from ppq_lightning.reports import atomic_write, write_json

NAME = "fashion-mnist-resnet18"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data", help="where the Fashion-MNIST files go")
    parser.add_argument("--output", default=str(ASSETS / BUILTIN[NAME][2]))
    parser.add_argument("--limit-train-batches", type=int, default=None, help="for quick checks")
    parser.add_argument("--max-test-images", type=int, default=None, help="for quick checks")
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    timm_name, kwargs, _ = BUILTIN[NAME]
    module = ImageClassifierModule(
        timm_name,
        source="timm",
        model_kwargs=kwargs,
        small_input=True,
        learning_rate=args.lr,
        max_epochs_hint=args.epochs,
    )
    data = VisionDataModule(
        "fashion_mnist",
        root=args.root,
        batch_size=args.batch_size,
        max_eval_samples=args.max_test_images,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=args.limit_train_batches,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    data.setup("test")
    metrics = module.evaluate(data.test_dataloader())
    command = "python " + shlex.join(sys.argv)
    report = {
        "model": NAME,
        "test_acc": metrics["acc"],
        "test_acc5": metrics["acc5"],
        "test_loss": metrics["loss"],
        "test_images": len(data.eval_indices),
        "epochs": args.epochs,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "command": command,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.model.state_dict().items()}
    with atomic_write(output, "wb") as f:
        f.write(save(state, metadata={k: str(v) for k, v in report.items()}))
    write_json(output.with_suffix(".json"), report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
