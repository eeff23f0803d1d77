"""The invariants of the compressed state (``docs/definitions.md``), checked on a model:

0. every weight of a compressed module is finite (a NaN would pass the two checks below:
   ``NaN * 0`` is NaN, and a NaN is never farther from anything than a tolerance);
1. every entry pruned by the recorded mask is exactly zero;
2. every weight lies on the recorded quantization grid (up to the rounding of the weight's own
   dtype), and zero is a grid point.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.errors import InvariantError
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.quant_grid import QuantGrid


def _grid_tolerance(w: Tensor, grid: QuantGrid) -> Tensor:
    """Allowed distance to the grid in steps: the weight dtype's rounding of a grid point."""
    eps = torch.finfo(w.dtype).eps
    step = grid._expand(grid.scale, w.shape[1])
    return 1e-4 + eps * grid.fake_quantize(w).abs() / step


def check_invariants(model: nn.Module) -> int:
    """Check every compressed module of ``model`` against its recorded mask and grid.

    Args:
        model: any module tree, e.g. a LightningModule or a HF model.

    Returns:
        The number of compressed modules checked.

    Raises:
        InvariantError: naming the module, when one of its weights is NaN or infinite, a
            pruned weight is non-zero, or a weight lies off its recorded quantization grid.
    """
    checked = 0
    for name, module, state in compressed_modules(model):
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # a structural record (e.g. removed blocks on their container): no weight
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
            w = weight_matrix(module)
            distance = grid.off_grid_distance(w)
            off = int((distance > _grid_tolerance(w, grid)).sum())
            if off:
                raise InvariantError(
                    f"{name}: {off} weight(s) lie off the {grid.bits}-bit grid recorded by stages "
                    f"{state.stages} (largest distance {distance.max().item():.3g} steps)."
                )
        checked += 1
    return checked
