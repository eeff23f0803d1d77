"""Layer Hessians ``H = 2 X^T X / N`` from calibration inputs, and their damped inverse."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ppq_lightning.errors import CompressionError, check_int, check_number


class HessianError(CompressionError):
    """The Hessian stays non positive definite even with the largest damping tried (a
    ``CompressionError``: the stage's layers are restored before it propagates)."""


def _not_positive_definite(h: Tensor, damp: float, tried: list[float], max_damp: float) -> str:
    """The message of a :class:`HessianError`: the ``damp`` given, the dampings tried, and
    what the Hessian holds (non-finite entries, or entries too large for float32)."""
    if len(tried) > 1:
        raised = ", ".join(f"{d:g}" for d in tried[1:])
        how = (
            f"neither with damp={damp:g} (as given) nor with the larger dampings tried after it "
            f"({raised}: raised tenfold up to {max_damp:g})"
        )
    else:
        how = f"with damp={damp:g} (as given; above {max_damp:g}, so not raised)"
    broken = int((~torch.isfinite(h)).sum())
    if broken:
        why = (
            f"It holds {broken} NaN or infinite entries: the layer's calibration inputs are too "
            "large for their products in float32. Check the data, or scale the inputs."
        )
    else:
        diagonal = torch.diag(h).double()
        why = f"Its diagonal ranges from {diagonal.min():.3g} to {diagonal.max():.3g}"
        if diagonal.abs().max() > 1e30:
            why += (
                ": entries this large underflow float32 in its inverse. Check the data, or "
                "scale the inputs."
            )
        else:
            why += "."
    return f"the Hessian of its calibration inputs is not positive definite, {how}. {why}"


class PreparedHessian(NamedTuple):
    """The upper Cholesky factor of ``H^-1`` as GPTQ/SparseGPT use it.

    Attributes:
        hinv: ``(cols, cols)`` upper-triangular factor of the damped inverse.
        damp: relative damping finally used.
        retries: how many times the damping was raised.
        dead: ``(cols,)`` bool, inputs that were always zero (their weights must be zeroed).
    """

    hinv: Tensor
    damp: float
    retries: int
    dead: Tensor


def check_solver_args(block_size: int, damp: float) -> None:
    """Validate the block size and damping of the OBS solvers (GPTQ, SparseGPT).

    Raises:
        PPQConfigError: when ``block_size`` is not an integer >= 1 or ``damp`` is not > 0.
    """
    check_int("block_size", block_size, minimum=1)
    check_number("damp", damp, low=0, low_open=True)


def accumulate_hessian(
    h: Tensor | None,
    x: Tensor,
    n_seen: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Running ``2 X^T X / N`` over the rows of ``x`` (``(n, cols)``); returns ``(H, N)``.
    (A convolution's Hessian comes from ``ops.conv_statistics``, without these rows.)

    ``h`` is updated in place (one ``(cols, cols)`` product is the only temporary). With
    ``dtype=torch.float64`` the products and the sum are in float64, whose rounding is far below
    float32's: the Hessian, rounded to float32 for the solvers, then (in practice) no longer
    depends on the order or grouping of the calibration batches. Float32 products folded into a
    float64 running mean are not enough: their rounding, rescaled at each batch's position and
    amplified where entries cancel, still flips 0.4 % of the float32 entries in the test's case.
    """
    x = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, cols)
    n_new = n_seen + x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[-1], x.shape[-1], device=x.device, dtype=dtype)
    h.mul_(n_seen / n_new)
    x = x * (2.0 / n_new) ** 0.5
    h += x.mT @ x
    return h, n_new


def prepare_hessian(h: Tensor, damp: float = 0.01, max_damp: float = 10.0) -> PreparedHessian:
    """Damp ``H`` (``damp * mean(diag H)`` on the diagonal), invert it and factor the inverse.

    Dead inputs (zero diagonal) get a unit diagonal. When a Cholesky factorisation fails the
    damping is multiplied by 10, as long as it stays <= ``max_damp`` (``damp`` itself is always
    tried).

    Raises:
        PPQConfigError: when ``damp`` is not positive.
        HessianError: when no damping tried makes ``H`` positive definite, quoting ``damp``,
            the dampings tried and whether ``H`` holds non-finite entries (the caller names the
            layer).
    """
    check_number("damp", damp, low=0, low_open=True)
    diagonal = torch.diag(h).float()
    dead = diagonal == 0
    diagonal = diagonal.masked_fill(dead, 1.0)
    mean_diag = diagonal.mean()
    current, retry, tried = float(damp), 0, []
    while retry == 0 or current <= max_damp:
        tried.append(current)
        # float32, as the reference implementations factor it; at most two (cols, cols)
        # matrices besides the caller's H are alive at a time
        damped = h.to(torch.float32, copy=True)
        damped.diagonal().copy_(diagonal + current * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(upper).all():
                return PreparedHessian(upper, current, retry, dead)
        current, retry = current * 10, retry + 1
    raise HessianError(_not_positive_definite(h, damp, tried, max_damp))


def whitening_factor(h: Tensor, damp: float = 0.01, max_damp: float = 10.0) -> Tensor:
    """Lower Cholesky factor ``S`` of the damped ``H`` (``H + damp * mean(diag H) I = S S^T``),
    in float64, as SVD-LLM and basis sharing whiten weights: ``||(W - W') S||_F^2`` is the
    output error ``||(W - W') X^T||^2`` (up to the damping and the factor ``2/N``).

    Dead inputs (zero diagonal) get a unit diagonal. When the factorisation fails the damping is
    multiplied by 10, as long as it stays <= ``max_damp`` (``damp`` itself is always tried).

    Raises:
        PPQConfigError: when ``damp`` is not positive.
        HessianError: when no damping tried makes ``H`` positive definite, quoting ``damp`` and
            the dampings tried.
    """
    check_number("damp", damp, low=0, low_open=True)
    h = h.double()
    diagonal = torch.diag(h).masked_fill(torch.diag(h) == 0, 1.0)
    current, tried = float(damp), []
    while not tried or current <= max_damp:
        tried.append(current)
        damped = h.clone()
        damped.diagonal().copy_(diagonal + current * diagonal.mean())
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return factor
        current *= 10
    raise HessianError(_not_positive_definite(h, damp, tried, max_damp))
