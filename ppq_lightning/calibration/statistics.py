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
from ppq_lightning.modules.views import conv_input, input_rows, is_convolution
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
ZERO, CONSTANT = "zero", "constant"
"""What :func:`uninformative` finds: inputs that are all zero, or all one vector's multiples."""
RANK_ONE_TOLERANCE = 1e-4  # every correlation of two inputs is +-1 within this: rank one


def _rank_one(h: Tensor, rows: int = 1024) -> bool:
    """Whether the non-zero Hessian ``h`` (``(cols, cols)``, at least two columns) has rank one:
    ``H_ij^2 = H_ii H_jj`` for every pair (equality in Cauchy-Schwarz: every two inputs
    correlated +-1), relative to each pair's ``H_ii H_jj`` (a Hessian dominated by one large
    input is not rank one), checked ``rows`` rows at a time (no second ``(cols, cols)``
    temporary)."""
    d = torch.diagonal(h).double().clamp(min=0)
    floor = 1e-12 * float(d.max()) ** 2  # below: float32 rounding of the products
    for start in range(0, h.shape[0], rows):
        block = h[start : start + rows].double()
        product = d[start : start + rows, None] * d[None, :]
        if bool((product - block**2 > RANK_ONE_TOLERANCE * product + floor).any()):
            return False
    return True


def uninformative(statistic: Tensor, kind: str = "hessian") -> str | None:
    """Whether a layer's calibration statistic says nothing about its weights.

    Args:
        statistic: a Hessian ``(cols, cols)`` or activation norms ``(cols,)``; stacked per
            group (``(groups, ...)``) for a grouped convolution.
        kind: ``"hessian"`` or ``"act_norm"`` (a key of :data:`ACCUMULATORS`).

    Returns:
        :data:`ZERO` when every input was zero (a solver would zero the whole layer: GPTQ and
        SparseGPT zero the weights of inputs that never fire, Wanda's scores are all 0);
        :data:`CONSTANT` for a Hessian whose inputs were all multiples of one vector (rank one:
        a constant input, one sample), which fits the weights to that one input; else None
        (also for a statistic holding NaN or infinite values, which the solver refuses).
    """
    if not bool(statistic.any()):
        return ZERO
    if kind != "hessian" or statistic.shape[-1] < 2 or not bool(torch.isfinite(statistic).all()):
        return None  # a non-finite Hessian is the solver's to refuse (ops.hessian)
    groups = statistic.reshape(-1, *statistic.shape[-2:])
    if all(not bool(h.any()) or _rank_one(h) for h in groups):
        return CONSTANT
    return None


def neutral_statistic(statistic: Tensor, kind: str = "hessian") -> Tensor:
    """A statistic that weighs every input alike, shaped like ``statistic``: the identity for
    a Hessian (GPTQ becomes round-to-nearest, SparseGPT magnitude pruning per block), ones for
    activation norms (Wanda becomes magnitude pruning). What a layer whose statistic is
    :func:`uninformative` is solved with instead of being zeroed."""
    if kind != "hessian":
        return torch.ones_like(statistic)
    eye = torch.eye(statistic.shape[-1], dtype=statistic.dtype, device=statistic.device)
    return eye.expand_as(statistic).clone()


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
        if is_convolution(layer):
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
