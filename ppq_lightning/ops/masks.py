"""Pruning masks from importance scores: per layer, per row, global, and N:M.

A mask is a bool tensor shaped like the weight: True keeps a weight, False prunes it. Every
function takes an optional ``keep`` mask of entries still alive; entries already pruned are
never revived and are counted towards the target sparsity (they are pruned first).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError, bad_value, check_number
from ppq_lightning.ops.packing import pack_bits, unpack_bits

_NM = re.compile(r"^(\d+):(\d+)$")


def check_sparsity(sparsity: float, argument: str = "sparsity") -> float:
    """Validate a sparsity: a number in [0, 1).

    Raises:
        PPQConfigError: when ``sparsity`` is not a real number in [0, 1).
    """
    return float(check_number(argument, sparsity, 0.0, 1.0, high_open=True))


def parse_pattern(pattern: str, argument: str = "pattern") -> tuple[int, int] | None:
    """Parse a sparsity pattern: ``"unstructured"`` gives None, ``"N:M"`` gives ``(N, M)``.

    ``N:M`` keeps N weights in every group of M consecutive input weights (2:4 is 50% sparse).

    Raises:
        PPQConfigError: for anything else, or N:M with N < 1 or N >= M; an integer such as 124
            (what YAML 1.1 reads an unquoted ``2:4`` as) with the advice to quote it.
    """
    if pattern == "unstructured":
        return None
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 60:
        n, m = divmod(pattern, 60)  # YAML 1.1 reads an unquoted 2:4 as 2*60+4 = 124
        raise bad_value(
            argument,
            pattern,
            f'"N:M" as a quoted string: YAML reads an unquoted {n}:{m} as the base-60 integer '
            f'{pattern}; write {argument}: "{n}:{m}"',
        )
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise bad_value(argument, pattern, '"unstructured" or "N:M" with integers 0 < N < M')
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise bad_value(argument, pattern, '"N:M" with integers 0 < N < M (e.g. "2:4")')
    return n, m


def resolve_sparsity(sparsity: float | None, pattern: str) -> tuple[float, tuple[int, int] | None]:
    """Validate a pruning target: ``(sparsity, (N, M) or None)``.

    ``N:M`` implies ``sparsity = 1 - N/M``; a given sparsity must agree with it.

    Raises:
        PPQConfigError: on a bad pattern, a sparsity outside [0, 1), a missing sparsity for
            unstructured pruning, or one that contradicts N:M.
    """
    nm = parse_pattern(pattern)
    if nm is None:
        if sparsity is None:
            raise PPQConfigError(
                'sparsity=None is not allowed for pattern="unstructured": '
                "expected a number in [0, 1)."
            )
        return check_sparsity(sparsity), None
    implied = 1 - nm[0] / nm[1]
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise bad_value("sparsity", sparsity, f"None or {implied:g} for pattern {pattern}")
    return implied, nm


def check_nm_width(nm: tuple[int, int] | None, cols: int, where: str) -> None:
    """Refuse an N:M pattern whose M does not divide a layer's input dimension ``cols``.

    Raises:
        PPQConfigError: naming the pattern, the layer ``where`` and its input dimension.
    """
    if nm is not None and cols % nm[1]:
        raise bad_value(
            "pattern",
            f"{nm[0]}:{nm[1]}",
            f"M dividing the input dimension of every targeted layer; {where} has {cols} "
            "inputs per output (list it in `ignore`)",
        )


def _masked_scores(scores: Tensor, keep: Tensor | None) -> Tensor:
    scores = scores.detach().float()
    if keep is None:
        return scores
    return torch.where(keep, scores, torch.full_like(scores, -torch.inf))


def _prune_smallest(scores: Tensor, n_prune: int) -> Tensor:
    """Mask over a 1-D score vector that prunes exactly its ``n_prune`` smallest entries."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        mask[torch.topk(scores, n_prune, largest=False).indices] = False
    return mask


def unstructured_mask(scores: Tensor, sparsity: float, keep: Tensor | None = None) -> Tensor:
    """Prune the ``round(sparsity * numel)`` lowest-scoring entries of the whole tensor.

    If ``keep`` already prunes more than that, the result is ``keep`` (no regrowth).
    """
    s = _masked_scores(scores, keep)
    n_prune = round(check_sparsity(sparsity) * s.numel())
    if keep is not None:
        n_prune = max(n_prune, int((~keep).sum()))
    return _prune_smallest(s.flatten(), n_prune).reshape(s.shape)


def row_mask(scores: Tensor, sparsity: float, keep: Tensor | None = None) -> Tensor:
    """Prune the ``round(sparsity * cols)`` lowest-scoring entries of every row of a 2-D tensor.

    This is Wanda's per-output comparison group. Rows already sparser keep their mask.
    """
    s = _masked_scores(scores, keep).flatten(1)  # (rows, cols)
    n_prune = round(check_sparsity(sparsity) * s.shape[1])
    mask = torch.ones_like(s, dtype=torch.bool)
    if n_prune > 0:
        mask.scatter_(1, torch.topk(s, n_prune, dim=1, largest=False).indices, False)
    if keep is not None:
        mask &= keep.flatten(1)
    return mask.reshape(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int, keep: Tensor | None = None) -> Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive entries along the last axis.

    For a weight of shape (out, in) the groups run along the input dimension, as sparse
    tensor cores expect. Entries pruned in ``keep`` stay pruned.

    Raises:
        PPQConfigError: when the input dimension is not a multiple of ``m``.
    """
    s = _masked_scores(scores, keep).flatten(1)  # (rows, cols)
    if s.shape[1] % m:
        raise bad_value("pattern", f"{n}:{m}", f"M dividing the input dimension {s.shape[1]}")
    groups = s.reshape(-1, m)  # (rows * cols / m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    mask = mask.reshape(scores.shape)
    return mask if keep is None else mask & keep


def global_masks(
    scores: list[Tensor], sparsity: float, keeps: list[Tensor | None] | None = None
) -> list[Tensor]:
    """Prune the lowest ``sparsity`` fraction of all entries of several tensors together.

    One threshold for every layer (global magnitude pruning): layers end up with different
    sparsities, and the total count of pruned entries is exact.
    """
    keeps = keeps if keeps is not None else [None] * len(scores)
    flat = torch.cat([_masked_scores(s, k).flatten() for s, k in zip(scores, keeps, strict=True)])
    n_prune = round(check_sparsity(sparsity) * flat.numel())
    n_prune = max(n_prune, sum(int((~k).sum()) for k in keeps if k is not None))
    mask = _prune_smallest(flat, n_prune)
    return [
        part.reshape(s.shape)
        for part, s in zip(mask.split([s.numel() for s in scores]), scores, strict=True)
    ]


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask of any shape into bits: uint8 ``(ceil(numel / 8),)``, 8x smaller."""
    return pack_bits(mask)


def unpack_mask(bits: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: the bool mask of ``shape``."""
    return unpack_bits(bits, math.prod(shape)).reshape(shape)
