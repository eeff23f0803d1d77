"""What the conformance suite checks, read off the tensors (never off our own records)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def weight_matrices(model: nn.Module) -> dict[str, Tensor]:
    """Every weight matrix of the linear, conv and attention layers, as ``(out, in)`` rows:
    ``nn.MultiheadAttention``'s packed Q/K/V (``in_proj_weight``) as three matrices."""
    matrices: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        owned = dict(module.named_parameters(recurse=False))
        if isinstance(module, (nn.Linear, nn.Conv2d)) and "weight" in owned:  # not a view
            matrices[name] = module.weight.detach().flatten(1)
        elif isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is not None:
                for part, rows in zip("qkv", module.in_proj_weight.detach().chunk(3), strict=True):
                    matrices[f"{name}.in_proj_weight[{part}]"] = rows
            else:
                for part in "qkv":
                    matrices[f"{name}.{part}_proj_weight"] = getattr(
                        module, f"{part}_proj_weight"
                    ).detach()
    return matrices


def zero_fraction(matrix: Tensor) -> float:
    return float((matrix == 0).float().mean())


def is_n_m(matrix: Tensor, n: int, m: int) -> bool:
    """At most ``n`` nonzeros in every group of ``m`` consecutive weights of a row."""
    rows, cols = matrix.shape
    groups = matrix[:, : cols - cols % m].reshape(rows, -1, m)
    return bool(((groups != 0).sum(-1) <= n).all())


def max_levels_per_row(matrix: Tensor) -> int:
    """The most distinct values any row holds (a per-channel b-bit grid: at most 2**b)."""
    return max(int(torch.unique(row).numel()) for row in matrix)
