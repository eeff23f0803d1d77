"""Basis sharing: one low-rank basis for the same projection of several layers.

"Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model Compression" (Wang et
al., 2024). The weights ``W_1 .. W_g`` (each ``(out, in)``) of one projection in ``g`` layers are
stacked along the output dimension and factorised by a truncated SVD (shown with
``split="coefficients"``; the default splits ``S_k`` between the factors, see below)::

    W_stack = [W_1; ...; W_g] ~= U_k S_k V_k^T        # (g*out, in)
    B = V_k^T                                         # (k, in), shared by the g layers
    [C_1; ...; C_g] = U_k S_k                         # C_i: (out, k), one per layer
    W_i ~= C_i B

By Eckart-Young this is the best rank-``k`` approximation of the stack in Frobenius norm. With
calibration activations (the paper's whitening, from SVD-LLM), the error is minimised on the
layer outputs instead: given the Hessian ``H ~ X^T X`` of the group's inputs (the layers'
inputs concatenated) and its Cholesky factor ``H = S S^T``::

    W_stack S ~= U_k S_k V_k^T                        # truncated SVD of the whitened stack
    B = V_k^T S^-1,   [C_1; ...; C_g] = U_k S_k

which is the best rank-``k`` approximation in ``||(W_stack - C B) X^T||_F``. The ``g`` layers
together store ``k * (in + g*out)`` weights instead of ``g * out * in``.

How the singular values are split between the factors does not change ``C B`` but decides how
well the factors survive later pruning or quantization: ``split="balanced"`` (the default)
puts ``S_k^1/2`` on each side (``C = U_k S_k^1/2``, ``B = S_k^1/2 V_k^T [S^-1]``), so neither
factor mixes entries whose scales span the whole spectrum; ``"coefficients"`` keeps them all in
the coefficients (``B = V_k^T``: orthonormal rows without whitening).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ppq_lightning.errors import PPQConfigError, bad_value, check_int

SPLITS = ("balanced", "coefficients")


class SharedBasis(NamedTuple):
    """A shared factorisation ``W_i ~= coefficients[i] @ basis``.

    Attributes:
        basis: ``(k, in)``: ``S_k^1/2 V_k^T`` (``split="balanced"``) or ``V_k^T``, times
            ``S^-1`` with whitening.
        coefficients: one ``(out_i, k)`` matrix per layer (its rows of ``U_k S_k^1/2`` or
            ``U_k S_k``).
        singular_values: all singular values of the (whitened) stacked weights, descending.
        relative_errors: per layer, ``||W_i - C_i B||_F^2 / ||W_i||_F^2``, or with whitening
            the output error ``||(W_i - C_i B) S||_F^2 / ||W_i S||_F^2``.
    """

    basis: Tensor
    coefficients: list[Tensor]
    singular_values: Tensor
    relative_errors: list[float]


def factor_params(rank: int, in_features: int, out_features: Sequence[int]) -> int:
    """Weights stored by a shared factorisation: ``k * (in + sum(out_i))`` (biases excluded)."""
    return rank * (in_features + sum(out_features))


def rank_for_ratio(ratio: float, group_size: int, out_features: int, in_features: int) -> int:
    """The largest rank ``k`` whose factors keep at most ``ratio`` of the group's weights:
    ``k = floor(ratio * g*out*in / (in + g*out))``."""
    g_out = group_size * out_features
    # a tiny epsilon so that e.g. ratio=0.5 at an exact integer is not lost to rounding
    return math.floor(ratio * g_out * in_features / (in_features + g_out) + 1e-9)


def max_rank(in_features: int, out_features: Sequence[int]) -> int:
    """The rank of the stacked weights at most: ``min(in, sum(out_i))``."""
    return min(in_features, sum(out_features))


def shared_basis(
    weights: Sequence[Tensor],
    rank: int,
    whitening: Tensor | None = None,
    split: str = "balanced",
) -> SharedBasis:
    """Factorise the weights of one projection in several layers with one shared basis.

    Args:
        weights: ``(out_i, in)`` matrices with the same ``in`` (one per layer of the group).
        rank: ``k``, from 1 to ``min(in, sum(out_i))``.
        whitening: ``(in, in)`` lower-triangular ``S`` with ``S S^T`` the (damped) Hessian of
            the group's inputs (:func:`~ppq_lightning.ops.hessian.whitening_factor`); None for
            the plain SVD of the weights.
        split: ``"balanced"`` or ``"coefficients"``: where the singular values go.

    Returns:
        The :class:`SharedBasis` (float32 tensors on the weights' device).

    Raises:
        PPQConfigError: when ``weights`` is empty, the input dimensions differ, ``rank`` is
            out of range, or ``split`` is unknown.
    """
    if not weights:
        raise PPQConfigError("shared_basis needs at least one weight matrix; got none.")
    in_features = weights[0].shape[1]
    outs = [w.shape[0] for w in weights]
    if any(w.dim() != 2 or w.shape[1] != in_features for w in weights):
        shapes = [tuple(w.shape) for w in weights]
        raise PPQConfigError(f"weights of shapes {shapes}: expected (out, in) with one `in`.")
    top = max_rank(in_features, outs)
    check_int("rank", rank, 1, top, allowed=f"an integer from 1 to {top} (min(in, sum of out))")
    if split not in SPLITS:
        raise bad_value("split", split, f"one of {', '.join(SPLITS)}")
    if whitening is not None and tuple(whitening.shape) != (in_features, in_features):
        raise bad_value(
            "whitening", tuple(whitening.shape), f"an ({in_features}, {in_features}) factor"
        )
    stack = torch.cat([w.float() for w in weights])  # (g*out, in)
    if whitening is None:
        u, s, vh = torch.linalg.svd(stack, full_matrices=False)  # (g*out, r), (r,), (r, in)
        basis = vh[:rank].contiguous()  # (k, in)
    else:  # SVD of W S in float64; B = V_k^T S^-1 by a triangular solve (S^T B^T = V_k)
        factor = whitening.to(stack.device, torch.float64)
        u, s, vh = torch.linalg.svd(stack.double() @ factor, full_matrices=False)
        basis = torch.linalg.solve_triangular(factor.T, vh[:rank].T, upper=True).T
        u, s, basis = u.float(), s.float(), basis.float().contiguous()
    if split == "balanced":
        root = s[:rank].sqrt()
        basis = (basis * root[:, None]).contiguous()
        coefficients = list((u[:, :rank] * root).split(outs))  # g x (out_i, k)
    else:
        coefficients = list((u[:, :rank] * s[:rank]).split(outs))
    errors = []
    factor32 = None if whitening is None else whitening.to(basis.device, torch.float32)
    for w, c in zip(weights, coefficients, strict=True):
        w = w.float()
        residual = w - c @ basis
        if factor32 is not None:  # in output space: ||D S||^2 / ||W S||^2
            residual, w = residual @ factor32, w @ factor32
        errors.append((residual.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item())
    return SharedBasis(basis, [c.contiguous() for c in coefficients], s, errors)
