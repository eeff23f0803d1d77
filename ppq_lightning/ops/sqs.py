"""SQS: a spike-and-slab posterior whose slab is a Gaussian mixture on a quantization grid.

After Wang, Jiang, Lin and Song, "SQS: Bayesian DNN Compression through Sparse Quantized
Sub-distributions" (2025). For a weight matrix ``W`` (rows, cols) and a symmetric per-channel
grid of ``b`` bits (step ``s_i = max_j |W_ij| / L`` of the initial weights, ``L = 2**(b-1) - 1``,
levels ``c_k = k s_i`` for ``k = -L..L``), every weight has the variational posterior::

    q(w_ij) = (1 - pi_ij) delta_0  +  pi_ij sum_k phi_k N(w_ij; c_k, sigma^2)

with a learned inclusion probability ``pi_ij = sigmoid(a_ij)`` (the spike at zero is pruning)
and a mixture over grid levels whose weights ``phi_k`` are learned per layer. The prior is the
same family with a fixed inclusion ``pi_0`` and uniform ``phi``, component width
``sigma = sigma_ratio * s_i``.

What is computed (the approximations are this module's, the paper has no public code):

- **window**: each weight's mixture is restricted to the three grid levels nearest to its
  latent value (the far components carry no mass at any useful ``sigma``), so the cost is
  ``3 x`` the weight count whatever the bit width;
- **forward** (training): a relaxed-Bernoulli (Concrete) sample of the gate,
  ``z = sigmoid((a + logistic noise) / t)``, times the responsibility-weighted level
  ``sum_k r_k c_k`` with ``r = softmax((log phi_k - (w - c_k)^2 / 2 sigma^2) / t)``: the
  expected component mean ("Bayesian averaging"), which sharpens to the most likely level as
  the temperature ``t`` anneals to 0; evaluation uses the collapsed weights;
- **KL**: ``KL(q || p) = KL(Bern(pi) || Bern(pi_0)) + pi KL(slab_q || slab_p)`` (the spikes
  coincide); the inclusion term exactly, the slab term for a Gaussian of width ``sigma`` around
  the latent weight against the prior mixture as ``-log p(w) - H(q)``: a kept weight costs
  about ``log K`` nats plus its distance to the nearest level, so the prior's sparsity and the
  grid's size both pull towards zeros;
- **collapse**: ``pi < 1/2`` gives an exact zero, every other weight takes its most likely
  level (``argmax_k log phi_k - (w - c_k)^2 / 2 sigma^2``): exactly on the grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ppq_lightning.ops.dead_zone import row_range, symmetric_levels
from ppq_lightning.ops.quant_grid import QuantGrid

WINDOW = (-1, 0, 1)  # offsets of the mixture components each weight sees, around round(w/s)


def sqs_grid(scale: Tensor, bits: int) -> QuantGrid:
    """The symmetric per-channel grid of the collapsed weights (``zero = 2**(bits-1)``)."""
    return QuantGrid(
        scale.float(), torch.full_like(scale.float(), 2 ** (bits - 1)), bits, None, True
    )


def window_codes(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The integer levels each weight's mixture covers: ``round(w/s) + {-1, 0, 1}`` clamped to
    ``[-L, L]``, shape (3, rows, cols), no gradient.

    The window is the leading dimension: softmax, sums and maxima over three contiguous
    planes are elementwise operations (over a trailing dimension of 3, torch's CPU kernels
    are about ten times slower)."""
    levels = symmetric_levels(bits)
    centre = torch.round(w.detach() / scale).clamp(-levels, levels)
    offsets = torch.tensor(WINDOW, device=w.device, dtype=centre.dtype).view(-1, 1, 1)
    return (centre.unsqueeze(0) + offsets).clamp(-levels, levels)


def component_logits(
    w: Tensor, scale: Tensor, codes: Tensor, log_phi: Tensor | None, sigma_ratio: float, bits: int
) -> Tensor:
    """``log phi_k + log N(w; c_k, sigma^2)`` up to a constant, over the window, (3, rows, cols);
    ``log_phi=None``: uniform mixture weights (the Gaussian term only)."""
    sigma = sigma_ratio * scale  # (rows, 1)
    gaussian = -((w - codes * scale) ** 2) / (2 * sigma**2)
    if log_phi is None:
        return gaussian
    return log_phi[(codes + symmetric_levels(bits)).long()] + gaussian


def soft_levels(
    w: Tensor, scale: Tensor, log_phi: Tensor, sigma_ratio: float, bits: int, temperature: float
) -> Tensor:
    """``sum_k r_k c_k``: the responsibility-weighted level of every weight (differentiable in
    ``w`` and ``log_phi``), (rows, cols)."""
    codes = window_codes(w, scale, bits)
    logits = component_logits(w, scale, codes, log_phi, sigma_ratio, bits)
    weights = torch.softmax(logits / temperature, dim=0)
    return (weights * codes).sum(0) * scale


def most_likely_codes(
    w: Tensor, scale: Tensor, log_phi: Tensor, sigma_ratio: float, bits: int
) -> Tensor:
    """The integer level (``-L..L``) of the most likely component of every weight."""
    codes = window_codes(w, scale, bits)
    logits = component_logits(w, scale, codes, log_phi, sigma_ratio, bits)
    return codes.gather(0, logits.argmax(0, keepdim=True)).squeeze(0)


def relaxed_gate(logit: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """A Concrete (relaxed Bernoulli) sample ``sigmoid((a + log u - log(1-u)) / t)``."""
    u = torch.rand(logit.shape, generator=generator, device=logit.device).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)


def inclusion_kl(logit: Tensor, prior: float) -> Tensor:
    """``sum KL(Bernoulli(sigmoid(a)) || Bernoulli(prior))`` over the weights."""
    log_pi, log_not = nn.functional.logsigmoid(logit), nn.functional.logsigmoid(-logit)
    pi = log_pi.exp()
    return (pi * (log_pi - math.log(prior)) + (1 - pi) * (log_not - math.log(1 - prior))).sum()


def slab_kl(w: Tensor, scale: Tensor, prior_sigma: float, sigma: float, bits: int) -> Tensor:
    """``KL(N(w, sigma^2) || sum_k (1/K) N(c_k, prior_sigma^2))`` of every weight, (rows, cols),
    in the usual approximation ``-log p(w) - H(q)`` (exact as the widths go to 0): a kept
    weight costs about ``log K`` nats (its code length) plus its squared distance to the
    nearest level in prior widths. Units: ``sigma`` and ``prior_sigma`` in grid steps."""
    levels = 2 * symmetric_levels(bits) + 1
    codes = window_codes(w, scale, bits)
    logits = component_logits(w, scale, codes, None, prior_sigma, bits)  # -(w-c)^2 / 2s0^2
    return -torch.logsumexp(logits, dim=0) + math.log(levels) + math.log(prior_sigma / sigma) - 0.5


class SQSPosterior(nn.Module):
    """The learnable posterior of one layer: inclusion logits ``a`` (rows, cols), the layer's
    mixture logits (``2L+1``), the fixed grid step per row and a step counter (buffers, so
    that a checkpoint resumes the noise and the annealing exactly).

    The logits are stored divided by ``logit_scale`` (parameters ``inclusion_raw``,
    ``mixture_raw``): an optimizer whose learning rate suits the weights (1e-4 for an LLM) then
    moves the logits ``logit_scale`` times faster (Adam's steps are about the learning rate in
    the parameter), as a variational posterior's parameters need.

    Args:
        weight: the layer's weight matrix (rows, cols) at the start: it fixes the grid.
        bits: bit width of the grid, 2-8.
        init_inclusion: the initial ``pi`` of every weight, in (0, 1).
        sigma_ratio: component width in grid steps.
        logit_scale: the factor the stored logits are multiplied by, > 0.
    """

    def __init__(
        self,
        weight: Tensor,
        bits: int,
        init_inclusion: float,
        sigma_ratio: float,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        self.bits, self.sigma_ratio, self.logit_scale = bits, sigma_ratio, logit_scale
        logit = math.log(init_inclusion / (1 - init_inclusion)) / logit_scale
        self.inclusion_raw = nn.Parameter(torch.full(weight.shape, logit, device=weight.device))
        self.mixture_raw = nn.Parameter(
            torch.zeros(2 * symmetric_levels(bits) + 1, device=weight.device)
        )
        self.register_buffer("scale", row_range(weight) / symmetric_levels(bits))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=weight.device))

    @property
    def inclusion_logit(self) -> Tensor:
        """``a``: the inclusion logits, (rows, cols)."""
        return self.inclusion_raw * self.logit_scale

    def log_phi(self) -> Tensor:
        """``log phi_k``: the layer's log mixture weights over the ``2L+1`` levels."""
        return torch.log_softmax(self.mixture_raw * self.logit_scale, dim=0)

    def inclusion(self) -> Tensor:
        """``pi = sigmoid(a)``."""
        return torch.sigmoid(self.inclusion_logit)

    def sample(self, w: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        """The weight of one training forward: gate sample times soft level, float32."""
        w = w.float()
        args = (w, self.scale, self.log_phi(), self.sigma_ratio, self.bits, temperature)
        # recomputed in the backward pass: the (rows, cols, 3) intermediates of every layer
        # would otherwise stay alive until the backward (about 60 bytes per weight)
        level = checkpoint(soft_levels, *args, use_reentrant=False)
        return relaxed_gate(self.inclusion_logit, temperature, generator) * level

    def collapse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, keep)``: exact zeros where ``pi < 1/2``, else the most likely level."""
        w = w.float()
        codes = most_likely_codes(w, self.scale, self.log_phi(), self.sigma_ratio, self.bits)
        keep = self.inclusion_logit >= 0
        return torch.where(keep, codes * self.scale, torch.zeros_like(w)), keep

    def kl(self, w: Tensor, prior_inclusion: float, prior_sigma: float) -> Tensor:
        """The layer's KL term: the inclusion KL plus the ``pi``-weighted slab KL (summed)."""
        slab = slab_kl(w.float(), self.scale, prior_sigma, self.sigma_ratio, self.bits)
        return inclusion_kl(self.inclusion_logit, prior_inclusion) + (self.inclusion() * slab).sum()
