import os

# before anything imports huggingface_hub, which reads these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# tiny models: one BLAS thread is faster than two fighting over small matrices (and than
# oversubscription when subprocess tests run beside the main process)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket

import pytest

from tests.helpers import TINY_LLAMA


@pytest.fixture
def tiny_lm():
    from ppq_lightning.models import CausalLMModule

    return CausalLMModule(model_config=TINY_LLAMA, seed=0)


@pytest.fixture(scope="session")
def tiny_data():
    from ppq_lightning.datamodules import TextDataModule

    data = TextDataModule(
        source="pydoc", tokenizer="bytes", seqlen=64, max_eval_windows=4, num_calibration_samples=4
    )
    data.setup("validate")
    return data


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails at once (and loudly)."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory):
    """A torchvision root holding Fashion-MNIST, unpacked once per session from Debian's
    ``dataset-fashion-mnist`` (the tests that need it skip where it is not installed)."""
    from pathlib import Path

    from ppq_lightning.datamodules import VisionDataModule
    from ppq_lightning.datamodules.vision_datasets import DEBIAN_FASHION_MNIST

    if not Path(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST})")
    root = tmp_path_factory.mktemp("fashion_mnist")
    VisionDataModule(root=str(root)).prepare_data()
    return root
