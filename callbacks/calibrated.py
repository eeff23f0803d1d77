"""Base class of the methods that need activation statistics from calibration data."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ppq_lightning.calibration import calibrate_sequentially, check_calibrate_on
from ppq_lightning.calibration_data import calibration_batches, check_num_batches
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.distributed import all_reduce_mean
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.layers import weight_matrix
from ppq_lightning.ops.hessian import accumulate_hessian
from ppq_lightning.ops.reconstruction import relative_output_error
from ppq_lightning.ops.wanda import accumulate_act_norms

STATISTICS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def layer_input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The input of ``layer`` as rows matching the columns of its weight matrix: ``(n, in)``.

    A ``Conv2d`` input is unfolded into the patches its kernel sees (``in = C * kh * kw``).

    Raises:
        PPQConfigError: for grouped convolutions, which have no single weight matrix.
    """
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise PPQConfigError(
                f"grouped convolutions (groups={layer.groups}) cannot be "
                "compressed by calibrated methods yet; list them in `ignore`."
            )
        patches = nn.functional.unfold(
            x, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )  # (B, C*kh*kw, L)
        return patches.transpose(1, 2).flatten(0, 1)
    return x.flatten(0, -2)


class LayerStatistics:
    """Per-layer statistics accumulated from calibration inputs (an engine ``Observer``).

    Layers fed the very same input tensor (q/k/v, gate/up) share one statistic: it is
    accumulated once, for the first of them.

    Args:
        accumulate: ``(acc, x, n_seen, dtype) -> (acc, n)``, e.g. ``accumulate_hessian``.
        dtype: the precision the statistics are summed in.
    """

    def __init__(self, accumulate: Callable[..., tuple[Tensor, int]], dtype: torch.dtype) -> None:
        self.accumulate, self.dtype = accumulate, dtype
        self._stats: dict[str, tuple[Tensor | None, int]] = {}
        self._shares: dict[str, str] = {}  # layer -> the layer whose statistic it shares
        self._last: list[Any] = [None, None, None]  # last input accumulated, its layer, name

    def observe(self, name: str, layer: nn.Module, x: Tensor) -> None:
        """Accumulate ``layer``'s input ``x`` (called by the engine on every forward).

        Raises:
            RuntimeError: when a layer shares another's input in some batches only.
        """
        last = self._last
        same = x is last[0] and isinstance(layer, nn.Linear) and type(layer) is type(last[1])
        if name in self._shares or (same and name not in self._stats):
            if not (same and self._shares.setdefault(name, last[2]) == last[2]):
                raise RuntimeError(
                    f"{name}: its input was the input of {self._shares[name]} in an earlier "
                    "calibration batch but not in this one; the model's forward is not "
                    "deterministic in its module calls."
                )
            return
        acc, seen = self._stats.get(name, (None, 0))
        self._stats[name] = self.accumulate(acc, layer_input_rows(layer, x), seen, self.dtype)
        self._last[:] = [x, layer, name]

    def has(self, name: str) -> bool:
        """Whether ``name`` has (or shares) a statistic."""
        return self._shares.get(name, name) in self._stats

    def take(self, names: list[str]) -> dict[str, Tensor]:
        """The float32 statistic of each of ``names``, averaged over data-parallel ranks (once
        per shared statistic), and forget them."""
        reduced: dict[str, Tensor] = {}
        for name in names:
            source = self._shares.get(name, name)
            if source not in reduced:
                reduced[source] = all_reduce_mean(*self._stats[source])[0].float()
        for name in names:
            self._stats.pop(name, None)
        return {name: reduced[self._shares.get(name, name)] for name in names}

    def end_block(self) -> None:
        """Forget the last input seen (inputs of different blocks are never shared)."""
        self._last[:] = [None, None, None]


class CalibratedCompression(CompressionCallback):
    """A compression method that solves a layer-wise problem from calibration statistics.

    Runs the sequential layer-wise engine (``ppq_lightning.calibration``): block by block, the
    target layers' inputs are accumulated into a Hessian ``2 X^T X / N`` (or, for Wanda, the
    mean squared input norms), then :meth:`compress_layer` solves each layer.

    Args:
        num_calibration_batches: batches taken from the calibration dataloader
            (``datamodule.calibration_dataloader()``, else the running loop's dataloader).
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
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: on a bad ``num_calibration_batches``, ``calibrate_on`` or
            ``statistics_dtype``; at run time on missing or empty calibration data, or NaN/Inf
            activations.
    """

    statistic: ClassVar[str] = "hessian"

    def __init__(
        self,
        *,
        num_calibration_batches: int = 128,
        calibrate_on: str = "compressed",
        device: str | None = None,
        statistics_dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        if statistics_dtype not in STATISTICS_DTYPES:
            raise bad_value("statistics_dtype", statistics_dtype, "float32 or float64")
        super().__init__(**kwargs)
        self.num_calibration_batches = check_num_batches(num_calibration_batches)
        self.calibrate_on = check_calibrate_on(calibrate_on)
        self.device = device
        self.statistics_dtype = statistics_dtype
        self.forward_fn: Callable[[nn.Module, Any], Any] | None = None
        self.calibration_report = None

    def compress_layer(self, name: str, layer: nn.Module, statistic: Tensor) -> dict[str, float]:
        """Compress one layer from its statistic, record its state; return its metrics."""
        raise NotImplementedError

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        accumulate = accumulate_hessian if self.statistic == "hessian" else accumulate_act_norms
        statistics = LayerStatistics(accumulate, STATISTICS_DTYPES[self.statistics_dtype])
        metrics: dict[str, dict[str, float]] = {}

        def solve(layers: dict[str, nn.Module]) -> None:
            taken = statistics.take(list(layers))
            statistics.end_block()
            for name, layer in layers.items():
                statistic = taken[name]
                before = weight_matrix(layer).float().clone()  # (out, in)
                start = time.perf_counter()
                values = self.compress_layer(name, layer, statistic)
                values["seconds"] = time.perf_counter() - start
                if self.statistic == "hessian":
                    after = weight_matrix(layer).float()
                    values["relative_error"] = relative_output_error(before, after, statistic)
                metrics[name] = values

        batches = calibration_batches(self.trainer, self.num_calibration_batches, self.dataloader)
        self.calibration_report = calibrate_sequentially(
            model,
            modules,
            batches,
            statistics.observe,
            solve,
            self.calibrate_on,
            self.device,
            self.forward_fn,
            desc=self.display_label,
        )
        return metrics
