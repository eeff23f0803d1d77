"""Base class of the methods that need activation statistics from calibration data."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ppq_lightning.calibration.config import CalibrationConfig
from ppq_lightning.calibration.engine import calibrate_sequentially
from ppq_lightning.calibration.statistics import (
    ZERO,
    LayerStatistics,
    neutral_statistic,
    uninformative,
)
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.block_checkpoints import block_progress, check_block_checkpoints
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.modules.views import is_grouped_convolution, weight_matrix
from ppq_lightning.ops.hessian import HessianError
from ppq_lightning.ops.reconstruction import relative_output_error

DEVICES = "None or a torch device such as 'cpu', 'cuda' or 'cuda:1'"


def check_device(device: str | torch.device | None) -> str | torch.device | None:
    """Accept None or what ``torch.device`` parses (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        PPQConfigError: naming ``device`` and the value.
    """
    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise bad_value("device", device, DEVICES)
    try:
        torch.device(device)
    except RuntimeError as err:
        raise bad_value("device", device, DEVICES) from err
    return device


def check_device_available(device: str | torch.device | None) -> None:
    """Refuse, before any weight changes, a ``device`` this machine does not have.

    Raises:
        PPQConfigError: naming ``device``, when it is a CUDA (or MPS) device and CUDA (MPS)
            is unavailable, or a CUDA index beyond the visible devices.
    """
    if device is None:
        return
    parsed = torch.device(device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise PPQConfigError(
                f"device={device!r} names CUDA, but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False): use device='cpu', or None to keep the "
                "model's placement."
            )
        if parsed.index is not None and parsed.index >= count:
            raise bad_value("device", device, f"a CUDA index below {count} (visible devices)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise PPQConfigError(
            f"device={device!r} names MPS, which is not available on this machine: use "
            "device='cpu', or None to keep the model's placement."
        )


class UninformativeCalibrationWarning(UserWarning):
    """A layer's calibration inputs say nothing about its weights (all zero, or constant)."""


class CalibratedCompression(CompressionCallback):
    """A compression method that solves a layer-wise problem from calibration statistics.

    Runs the sequential layer-wise engine (``ppq_lightning.calibration.engine``): block by
    block, the target layers' inputs are accumulated into a Hessian ``2 X^T X / N`` (or, for
    Wanda, the mean squared input norms), then :meth:`compress_layer` solves each layer.

    Args:
        num_calibration_batches: batches taken from the calibration dataloader
            (``datamodule.calibration_dataloader()``, else the running loop's dataloader: the
            train dataloader in ``fit``; in ``validate`` the data it evaluates on, which the
            stage warns about and its report records). A shorter dataloader gives all its
            batches, with a warning naming both numbers.
        calibrate_on: ``"compressed"`` (statistics from the model as compressed so far) or
            ``"original"`` (from the dense model).
        device: where each block runs during calibration (e.g. ``"cuda"``); None keeps the
            model's placement.
        statistics_dtype: ``"float32"`` (as the reference implementations) or ``"float64"``:
            the precision the statistics are summed in; the solvers always get them in float32.
            In float64 the result no longer depends on the order or grouping of the calibration
            batches (GPTQ's and SparseGPT's error feedback amplify float32's summation rounding
            into perplexity differences of a few tenths on SmolLM2), at about twice the cost of
            the accumulation matrix products (see docs/benchmarks.md).
        block_checkpoints: save each finished block's result to disk, so a killed run started
            again with the same command continues from its last finished block and ends with
            the same weights (docs/scale.md, "Resuming a calibration"): ``True`` (default)
            under the Trainer's ``default_root_dir`` (nothing without a Trainer), a folder path
            (also for ``apply`` without a Trainer), or ``False``. The files are deleted when the
            stage succeeds. Not part of the stage's identity.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers``,
            ``forward_fn`` (how the model is called on a batch; see ``CompressionStage``).

    Raises:
        PPQConfigError: on a bad ``num_calibration_batches``, ``calibrate_on``,
            ``statistics_dtype``, ``device`` (not a torch device), ``block_checkpoints`` or
            ``forward_fn``; a saved block file that cannot be read (``CorruptStateError``); at run
            time (before any weight changes) on a ``device`` this machine does not have (CUDA
            unavailable), on missing or empty calibration data, a batch the default forward
            cannot feed to the model (naming the module, its forward, the batch and
            ``forward_fn``), or NaN/Inf activations.
    """

    reads_layer_inputs = True  # every target's statistics come from its own forward
    streams_blocks = True  # the engine holds one block at a time

    statistic: ClassVar[str] = "hessian"
    config_class: ClassVar[type[CalibrationConfig]] = CalibrationConfig

    def __init__(
        self,
        *,
        num_calibration_batches: int = 128,
        calibrate_on: str = "compressed",
        device: str | None = None,
        statistics_dtype: str = "float32",
        block_checkpoints: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_calibration_batches=num_calibration_batches,
            calibrate_on=calibrate_on,
            statistics_dtype=statistics_dtype,
            **kwargs,
        )
        self.device = check_device(device)
        self.block_checkpoints = check_block_checkpoints(block_checkpoints)
        self.calibration_report = None

    def compress_layer(self, name: str, layer: nn.Module, statistic: Tensor) -> dict[str, float]:
        """Compress one layer from its statistic, record its state; return its metrics.

        A grouped convolution's statistic is stacked per group (``grouped(layer)``); the
        methods solve it group by group with ``ops.grouped.solve_by_groups``.
        """
        raise NotImplementedError

    def informative_statistic(self, name: str, statistic: Tensor) -> Tensor:
        """``statistic`` of layer ``name``, or, when its calibration inputs say nothing about
        its weights (``calibration.statistics.uninformative``: all zero, or all multiples of one
        vector), a statistic that weighs every input alike (``neutral_statistic``: GPTQ then
        rounds to nearest, SparseGPT and Wanda prune by magnitude), with a warning naming the
        layer. A zero statistic would zero the whole layer (the solvers zero the weights of
        inputs that never fire), and a rank-one Hessian fits it to one input."""
        problem = uninformative(statistic, self.statistic)
        if problem is None:
            return statistic
        what = (
            "are all zero (its statistic is 0: solved with it, the layer would be zeroed)"
            if problem == ZERO
            else "are constant (every input row is a multiple of one vector: its Hessian has "
            "rank one, and solved with it the layer would fit that one input)"
        )
        rank_zero_warn(
            f"[ppq] stage {self.name!r} ({type(self).__name__}): the calibration inputs of "
            f"{name} {what}; it is compressed as if every input weighed alike instead "
            "(round-to-nearest, magnitude pruning). Check the calibration data (a batch of "
            "padding, a constant image, too few samples) or the layers before it.",
            category=UninformativeCalibrationWarning,
        )
        return neutral_statistic(statistic, self.statistic)

    @staticmethod
    def grouped(layer: nn.Module) -> bool:
        """Whether ``layer`` is a grouped (or depthwise) convolution, solved group by group."""
        return is_grouped_convolution(layer)

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        check_device_available(self.device)
        statistics = LayerStatistics(self.statistic, self.statistics_dtype)
        metrics: dict[str, dict[str, float]] = {}

        def solve(layers: dict[str, nn.Module]) -> None:
            taken = statistics.take(list(layers))
            statistics.end_block()
            for name, layer in layers.items():
                statistic = self.informative_statistic(name, taken[name])
                before = weight_matrix(layer).float().clone()  # (out, in)
                start = time.perf_counter()
                try:
                    values = self.compress_layer(name, layer, statistic)
                except HessianError as error:
                    raise HessianError(
                        f"stage {self.name!r} ({type(self).__name__}), layer {name}: {error} "
                        "Its weights and those of every layer this stage had compressed are "
                        "restored."
                    ) from error
                values["seconds"] = time.perf_counter() - start
                if self.statistic == "hessian":
                    after = weight_matrix(layer).float()
                    values["relative_error"] = relative_output_error(before, after, statistic)
                metrics[name] = values

        batches = self.calibration_batches(self.num_calibration_batches)
        progress = block_progress(self, self.block_checkpoints, metrics)
        self.calibration_report = calibrate_sequentially(
            model,
            modules,
            batches,
            statistics.observe,
            solve,
            self.calibrate_on,
            self.device,
            self.forward_fn,
            desc=self.name,
            progress=progress,
        )
        if progress is not None:
            progress.finish()
        return metrics
