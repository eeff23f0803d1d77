"""The invariants of the compressed state (``docs/definitions.md``), checked on a model:

0. every weight of a compressed module is finite (a NaN would pass the two checks below:
   ``NaN * 0`` is NaN, and a NaN is never farther from anything than a tolerance);
1. every entry pruned by the recorded mask is exactly zero;
2. every weight lies on the recorded quantization grid, and zero is a grid point: a bf16 or
   fp16 weight is exactly a grid value computed in float32 and rounded once to its dtype
   (``QuantGrid.on_grid``); a float32 weight lies within ``1e-4`` steps (plus its own rounding)
   of a grid value.

A layer whose training stage is still training (a weight transform attached: QAT, CoDeQ) holds
a latent weight that its stage owns until it ends; it is checked once the stage has ended.
They are checked after a checkpoint loads (``edits.loading``) and, in the test suite, after
every stage (``callbacks.stage``: :data:`CHECK_AFTER_STAGES`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.state import CompressionState, compressed_modules, get_state
from ppq_lightning.errors import InvariantError
from ppq_lightning.modules.transforms import has_weight_transform
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.grid import Grid
from ppq_lightning.ops.grid_formats import INT
from ppq_lightning.ops.quant_grid import QuantGrid, indistinct_levels

CHECK_AFTER_STAGES = "PPQ_CHECK_INVARIANTS"
"""An environment variable: set to ``1``, every compression stage checks the invariants of the
whole model after it is applied (``callbacks.stage``); the test suite sets it, so a recorded state
that is not the real one fails the test that produced it."""


def checks_after_stages() -> bool:
    """Whether :data:`CHECK_AFTER_STAGES` is set to ``1``."""
    return os.environ.get(CHECK_AFTER_STAGES) == "1"


def _grid_tolerance(w: Tensor, grid: Grid) -> Tensor | float:
    """Allowed distance to the grid in steps: the weight dtype's rounding of a grid point (on
    an integer grid; the other kinds' values are float32 numbers a 32-bit weight holds
    exactly, so only a float32 rounding of the distance itself is allowed)."""
    if not isinstance(grid, QuantGrid):
        return 1e-4
    eps = torch.finfo(w.dtype).eps
    step = grid._expand(grid.scale, w.shape[1])
    return 1e-4 + eps * grid.fake_quantize(w).abs() / step


def _grid_name(state: CompressionState) -> str:
    """``4-bit`` for an integer grid, else the format's name (``nvfp4``, ``Q4_K``)."""
    return f"{state.bits}-bit" if state.grid_format == INT else state.grid_format


def check_invariants(model: nn.Module, only: Iterable[str] | None = None) -> int:
    """Check every compressed module of ``model`` against its recorded mask and grid.

    Args:
        model: any module tree, e.g. a LightningModule or a HF model.
        only: check only the modules of these names (those a loaded state dict carried
            states for, say); None for every compressed module.

    Returns:
        The number of compressed modules checked (a layer whose training stage is still
        training, with a weight transform attached, is not checked).

    Raises:
        InvariantError: naming the module, when one of its weights is NaN or infinite, a
            pruned weight is non-zero, or a weight lies off its recorded quantization grid.
    """
    names = None if only is None else set(only)
    checked = 0
    for name, module, state in compressed_modules(model):
        if names is not None and name not in names:
            continue
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # a structural record (e.g. removed blocks on their container): no weight
        if has_weight_transform(module):
            continue  # a latent weight its training stage owns until it ends
        check_layer(name, module, state)
        checked += 1
    return checked


def check_layer(name: str, module: nn.Module, state: CompressionState) -> None:
    """Check one compressed layer's weight against its recorded state (:func:`check_invariants`).

    Raises:
        InvariantError: naming ``name``, as :func:`check_invariants`.
    """
    weight = module.weight.detach()
    broken = int((~torch.isfinite(weight)).sum())
    if broken:
        raise InvariantError(
            f"{name}: {broken} weight(s) are NaN or infinite; a compressed layer (stages "
            f"{state.stages}) must hold finite weights on its mask and grid."
        )
    if state.mask is not None:
        revived = int((weight[~state.mask] != 0).sum())
        if revived:
            raise InvariantError(
                f"{name}: {revived} pruned weight(s) are non-zero; the mask recorded by "
                f"stages {state.stages} says they must stay exactly 0."
            )
    grid = state.grid
    if grid is not None:
        grid = grid.to(weight.device)
        w = weight_matrix(module).detach()
        distance = grid.off_grid_distance(w)
        if torch.finfo(w.dtype).bits <= 16:  # the float32 grid value rounded once to the dtype
            off = int((~grid.on_grid(w)).sum())
        else:
            off = int((distance > _grid_tolerance(w, grid)).sum())
        if off:
            raise InvariantError(
                f"{name}: {off} weight(s) lie off the {_grid_name(state)} grid recorded by stages "
                f"{state.stages} (largest distance {distance.max().item():.3g} steps)."
            )


def indistinct_grids(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, str]]:
    """The layers among ``names`` whose recorded grid has neighbouring levels that their weight's
    dtype rounds to one value (``ops.quant_grid.indistinct_levels``: an asymmetric 8-bit grid
    in bf16), with how many level pairs and the dtype. Such a layer holds fewer distinct values
    than its bit width says, and the code read back from its weight (what the exporters write)
    is the one nearest to the shared value, not necessarily the one the quantizer chose."""
    found: dict[str, tuple[int, str]] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        state, weight = get_state(module), getattr(module, "weight", None)
        if state is None or state.grid is None or not isinstance(weight, Tensor):
            continue
        if not weight.is_floating_point():
            continue
        if not isinstance(state.grid, QuantGrid):
            continue  # FP / K-quant levels: 4-6 significant bits, which bf16 keeps apart
        count = indistinct_levels(state.grid.to(weight.device), weight.dtype)
        if count:
            found[name] = (count, str(weight.dtype).removeprefix("torch."))
    return found
