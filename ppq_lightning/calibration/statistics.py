"""Per-layer statistics of calibration inputs, accumulated while the engine runs the blocks.

A statistic is a Hessian ``2 X^T X / N`` (GPTQ, SparseGPT, whitened basis sharing) or the mean
squared input norms (Wanda, channel importance), summed in float32 or float64 and averaged over
data-parallel ranks before a solver reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration.distributed import all_reduce_mean
from ppq_lightning.errors import PPQConfigError, check_choice
from ppq_lightning.modules.views import conv_input, input_rows
from ppq_lightning.ops.conv_statistics import accumulate_conv_act_norms, accumulate_conv_hessian
from ppq_lightning.ops.hessian import accumulate_hessian
from ppq_lightning.ops.wanda import accumulate_act_norms

ACCUMULATORS: dict[str, Callable[..., tuple[Tensor, int]]] = {
    "hessian": accumulate_hessian,
    "act_norm": accumulate_act_norms,
}
"""Statistic name -> ``(acc, rows, n_seen, dtype) -> (acc, n)`` over a layer's input rows."""
CONV_ACCUMULATORS: dict[str, Callable[..., tuple[Tensor, int]]] = {
    "hessian": accumulate_conv_hessian,
    "act_norm": accumulate_conv_act_norms,
}
"""The same for a ``Conv2d``, from its padded input: ``(acc, x, geometry, n_seen, dtype)``
(no patch matrix is built)."""
STATISTICS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_statistics_dtype(value: str) -> str:
    """Validate ``statistics_dtype``: ``"float32"`` or ``"float64"``.

    Raises:
        PPQConfigError: for anything else.
    """
    return check_choice("statistics_dtype", value, STATISTICS_DTYPES)


class LayerStatistics:
    """Per-layer statistics accumulated from calibration inputs (an engine ``Observer``).

    Layers fed the very same input tensor (q/k/v, gate/up) share one statistic: it is
    accumulated once, for the first of them.

    Args:
        statistic: a key of :data:`ACCUMULATORS` (``"hessian"`` or ``"act_norm"``).
        dtype: the precision the statistics are summed in (a key of :data:`STATISTICS_DTYPES`).

    Raises:
        PPQConfigError: on an unknown statistic or dtype.
    """

    def __init__(self, statistic: str, dtype: str = "float32") -> None:
        self.accumulate = ACCUMULATORS[check_choice("statistic", statistic, ACCUMULATORS)]
        self.accumulate_conv = CONV_ACCUMULATORS[statistic]
        self.dtype = STATISTICS_DTYPES[check_statistics_dtype(dtype)]
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
        if isinstance(layer, nn.Conv2d):
            padded, geometry = conv_input(layer, x)
            self._stats[name] = self.accumulate_conv(acc, padded, geometry, seen, self.dtype)
        else:
            self._stats[name] = self.accumulate(acc, input_rows(layer, x), seen, self.dtype)
        self._last[:] = [x, layer, name]

    def has(self, name: str) -> bool:
        """Whether ``name`` has (or shares) a statistic."""
        return self._shares.get(name, name) in self._stats

    def take(self, names: list[str]) -> dict[str, Tensor]:
        """The float32 statistic of each of ``names``, averaged over data-parallel ranks (once
        per shared statistic), and forget them.

        Raises:
            PPQConfigError: naming a layer that was never observed (its forward never ran).
        """
        never = [name for name in names if not self.has(name)]
        if never:
            listed = ", ".join(never[:3]) + (
                f" and {len(never) - 3} more" if len(never) > 3 else ""
            )
            raise PPQConfigError(
                f"{listed} never ran during calibration: the model's forward did not call "
                "them as modules on any calibration batch (it reads their weights as tensors, "
                "or skips them), so they have no statistics. List them in `ignore`."
            )
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
