"""The learned dead-zone quantizer of CoDeQ: magnitude pruning inside a uniform quantizer.

For a weight matrix ``W`` (rows, cols), per output row ``i``::

    m_i = max_j |W_ij|                          range of the row (no gradient)
    s_i = m_i / (2**(b-1) - 1)                  symmetric step of a b-bit grid
    d_i = sigmoid(theta) * m_i                  dead-zone half-width, in [0, m_i)
    q(W_ij) = 0                      if |W_ij| <= d_i
              s_i * round(W_ij / s_i)  otherwise

``theta`` (one per layer) is learned; ``b`` is fixed or learned (a continuous parameter clamped
to [2, 8] and rounded). Weights inside the dead zone are exactly 0 and every other value is a
point of the symmetric per-channel grid (:func:`dead_zone_grid`). Gradients (straight-through):
rounding passes the gradient unchanged; the hard gate ``1[|w| > d]`` is differentiated as the
soft gate ``sigmoid((|w| - d) / (temperature * m))``, which carries the gradient to ``theta``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ppq_lightning.ops.quant_grid import MAX_BITS, MIN_BITS, QuantGrid
from ppq_lightning.ops.ste import round_ste, straight_through

MIN_DEAD_ZONE = 1e-4  # the smallest initial dead zone (a fraction of max|w|): logit(0) = -inf


def learned_bits(bit_param: Tensor) -> Tensor:
    """Integer bit width from a continuous parameter: clamp to [2, 8], round (STE)."""
    return round_ste(bit_param.clamp(MIN_BITS, MAX_BITS))


def symmetric_levels(bits: Tensor | int) -> Tensor | int:
    """Largest code of a symmetric b-bit grid, ``2**(b-1) - 1`` (differentiable in ``b``)."""
    return 2 ** (bits - 1) - 1


def row_range(w: Tensor) -> Tensor:
    """``max|w|`` of every row, (rows, 1), without gradient; 1 for an all-zero row."""
    m = w.detach().float().abs().amax(dim=1, keepdim=True)  # (rows, 1)
    return torch.where(m > 0, m, torch.ones_like(m))


def dead_zone_quantize(w: Tensor, theta: Tensor, bits: Tensor | int, temperature: float) -> Tensor:
    """``q(w)`` of the dead-zone quantizer (float32), with straight-through gradients.

    Args:
        w: latent weights, (rows, cols).
        theta: dead-zone parameter (scalar): ``d = sigmoid(theta) * max|w|`` per row.
        bits: bit width, an int or a scalar tensor holding an integer value (learned bits).
        temperature: width of the soft gate used for the gradient, in units of ``max|w|``.

    Returns:
        ``q(w)``, float32, (rows, cols): exactly 0 inside the dead zone, on the grid outside.
    """
    w = w.float()
    m = row_range(w)  # (rows, 1)
    step = m / symmetric_levels(bits)  # (rows, 1)
    d = torch.sigmoid(theta.float()) * m  # (rows, 1)
    rounded = step * round_ste(w / step)  # (rows, cols): k * step, |k| <= 2**(b-1) - 1
    hard = (w.abs() > d).float()
    soft = torch.sigmoid((w.abs() - d) / (temperature * m))
    return straight_through(hard, soft) * rounded


def keep_rates(
    w: Tensor, theta: Tensor, bits: Tensor | int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Soft and hard fraction of weights the quantizer keeps (non-zero).

    Returns:
        ``(soft, hard)``: ``soft`` is the mean soft gate ``sigmoid((|w| - d) / (T m))``, with a
        gradient to ``theta`` only (``w`` is detached); ``hard`` (no gradient) is the measured
        fraction of non-zero ``q(w)``: weights outside the dead zone that do not round to 0.
    """
    w = w.detach().float()
    m = row_range(w)  # (rows, 1)
    d = torch.sigmoid(theta.float()) * m  # (rows, 1)
    soft = torch.sigmoid((w.abs() - d) / (temperature * m)).mean()
    with torch.no_grad():
        step = m / symmetric_levels(bits.detach() if isinstance(bits, Tensor) else bits)
        hard = ((w.abs() > d) & (torch.round(w / step) != 0)).float().mean()
    return soft, hard


def dead_zone_grid(w: Tensor, bits: int) -> QuantGrid:
    """The symmetric per-channel grid ``q`` lies on: ``scale = max|w| / (2**(b-1) - 1)`` per
    row, ``zero = 2**(b-1)``."""
    m = row_range(w)  # (rows, 1)
    scale = m / symmetric_levels(bits)
    return QuantGrid(scale, torch.full_like(scale, 2 ** (bits - 1)), bits, None, True)


def initial_theta(fraction: float) -> float:
    """``theta`` with ``sigmoid(theta) = fraction`` (at least :data:`MIN_DEAD_ZONE`)."""
    fraction = max(fraction, MIN_DEAD_ZONE)
    return math.log(fraction / (1 - fraction))


class DeadZoneQuantizer(nn.Module):
    """The learnable parameters of one layer's dead-zone quantizer, and the quantizer.

    Args:
        bits: the (initial) bit width, 2 to 8.
        init_dead_zone: initial ``d / max|w|``, in [0, 1); None starts at half a step
            (``0.5 / (2**(bits-1) - 1)``), where ``q`` equals plain symmetric rounding.
        temperature: soft-gate width for the gradient, in units of ``max|w|``, > 0.
        learn_bits: also learn the bit width (parameter ``bit_width``).

    Attributes:
        theta: the dead-zone parameter (scalar).
        bit_width: the continuous bit width (scalar) when ``learn_bits``, else None.
    """

    def __init__(
        self,
        bits: int,
        init_dead_zone: float | None,
        temperature: float,
        learn_bits: bool,
    ) -> None:
        super().__init__()
        fraction = 0.5 / symmetric_levels(bits) if init_dead_zone is None else init_dead_zone
        self.theta = nn.Parameter(torch.tensor(initial_theta(fraction)))
        self.bit_width = nn.Parameter(torch.tensor(float(bits))) if learn_bits else None
        self.fixed_bits, self.temperature = bits, temperature

    def bits(self) -> Tensor | int:
        """The bit width used now: rounded learned bits (a scalar tensor) or the fixed int."""
        return self.fixed_bits if self.bit_width is None else learned_bits(self.bit_width)

    def integer_bits(self) -> int:
        return int(self.bits())

    def dead_zone(self) -> float:
        """``d / max|w|`` now."""
        return float(torch.sigmoid(self.theta.detach()))

    def forward(self, w: Tensor) -> Tensor:
        """``q(w)`` of the (rows, cols) matrix ``w``, float32."""
        return dead_zone_quantize(w, self.theta, self.bits(), self.temperature)

    def keep_rates(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(soft, hard)`` keep rates of ``w`` (see :func:`keep_rates`)."""
        return keep_rates(w, self.theta, self.bits(), self.temperature)

    @torch.no_grad()
    def project(self) -> None:
        """Keep the learned bit width in [2, 8] (after an optimizer step)."""
        if self.bit_width is not None:
            self.bit_width.clamp_(MIN_BITS, MAX_BITS)

    def extra_repr(self) -> str:
        bits = self.fixed_bits if self.bit_width is None else f"{float(self.bit_width):.2f}"
        return f"bits={bits}, dead_zone={self.dead_zone():.4f}, temperature={self.temperature}"
