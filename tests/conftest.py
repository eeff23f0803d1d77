import os

# before anything imports huggingface_hub, which reads these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# tiny models: one BLAS thread is faster than two fighting over small matrices (and than
# oversubscription when subprocess tests run beside the main process)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# every compression stage checks the invariants of the whole model after it is applied
# (callbacks.stage.CompressionStage.conclude), in this process and in the CLI's subprocesses
os.environ.setdefault("PPQ_CHECK_INVARIANTS", "1")

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


def missing(what: str, install: str) -> None:
    """Data or a package a test needs is absent: the test fails under CI (``CI=true``, where
    ``make test`` installs everything), and is skipped elsewhere; either way the message says
    how to install it."""
    message = f"{what} is not installed; install it with: {install}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message} (CI=true: the tests that need it fail instead of skipping)")
    pytest.skip(message)


def _apt(package: str) -> str:
    return f"sudo apt-get update && sudo apt-get install -y {package} (or: make vision-data)"


@pytest.fixture(scope="session")
def debian_fashion_mnist():
    """Debian's ``dataset-fashion-mnist`` (``make test`` installs it with apt-get)."""
    from pathlib import Path

    from ppq_lightning.datamodules.vision_datasets import DEBIAN_FASHION_MNIST

    if not Path(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file():
        missing(
            f"Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})",
            _apt("dataset-fashion-mnist"),
        )


@pytest.fixture(scope="session")
def debian_opencv_doc():
    """The sample photos of Debian's ``opencv-doc`` (``make test`` installs it with apt-get)."""
    from pathlib import Path

    from ppq_lightning.datamodules.photos import OPENCV_DATA

    if not Path(OPENCV_DATA).is_dir():
        missing(f"Debian's opencv-doc ({OPENCV_DATA})", _apt("opencv-doc"))


@pytest.fixture(scope="session")
def all_photo_sources(debian_opencv_doc):
    """Every source of ``PhotoDataModule``: opencv-doc, scikit-image and scikit-learn."""
    import importlib.util

    for module, package in (("skimage", "scikit-image"), ("sklearn", "scikit-learn")):
        if importlib.util.find_spec(module) is None:
            missing(package, "pip install -e '.[photos]' (make test does)")


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory, debian_fashion_mnist):
    """A torchvision root holding Fashion-MNIST, unpacked once per session from Debian's
    ``dataset-fashion-mnist`` (see :func:`debian_fashion_mnist` where it is not installed)."""
    from ppq_lightning.datamodules import VisionDataModule

    root = tmp_path_factory.mktemp("fashion_mnist")
    VisionDataModule(root=str(root)).prepare_data()
    return root
