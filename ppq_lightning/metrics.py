"""Compression rates and order metrics, as defined in ``shared/DESIGN.md``.

- Nominal compression rate of one method: ``C_P = 1 / (1 - p)``, ``C_Q = B_orig / B_Q``; of a
  schedule: their product, i.e. ``B_orig / ((1 - p) * B_Q)``.
- Measured compression rate: ``B_orig`` bits per original weight divided by the bits the real
  tensors need, counting values, scales, zero points and the mask (or N:M index) overhead.
- Metric ``M`` is higher-is-better (accuracy, or ``-perplexity``).
- Performance gap ``G(f1, f2) = M(f1(phi)) - M(f2(phi))``.
- Order advantage ``A(f1 -> f2) = M((f2 o f1)(phi)) - M((f1 o f2)(phi))``: positive when
  applying ``f1`` first is better.
- Compression Equivalence Ratio ``C*_f``: the quantization ratio at which quantization alone
  matches ``f`` (interpolated on a measured quantization-only curve).
- Progressive Intensity Hypothesis: the best order applies the weaker perturbation first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.layers import is_compressible
from ppq_lightning.ops.masks import parse_pattern
from ppq_lightning.state import CompressionState, compressed_modules
from ppq_lightning.targets import resolve_targets

SCALE_BITS = 16  # scales are stored in fp16


def nominal_compression_rate(
    sparsity: float = 0.0, bits: float | None = None, b_orig: int = 16
) -> float:
    """``C = 1/(1-p) * B_orig/B_Q`` (``bits=None`` means not quantized: ``B_Q = B_orig``)."""
    return 1.0 / (1.0 - sparsity) * b_orig / (bits if bits is not None else b_orig)


def performance_gap(metric_f1: float, metric_f2: float) -> float:
    """``G(f1, f2) = M(f1(phi)) - M(f2(phi))``; positive when ``f1`` hurts less."""
    return metric_f1 - metric_f2


def order_advantage(metric_f1_first: float, metric_f2_first: float) -> float:
    """``A(f1 -> f2) = M(f2 o f1) - M(f1 o f2)``; positive when applying ``f1`` first wins.

    Args:
        metric_f1_first: ``M`` after applying ``f1`` then ``f2``.
        metric_f2_first: ``M`` after applying ``f2`` then ``f1``.
    """
    return metric_f1_first - metric_f2_first


def metric_from_perplexity(ppl: float) -> float:
    """The higher-is-better metric for language models: ``M = -ppl``."""
    return -ppl


@dataclass(frozen=True)
class LayerCost:
    """Storage of one compressed weight, in bits."""

    numel: int
    nonzero: int
    value_bits: int
    payload_bits: float
    overhead_bits: float
    nominal_sparsity: float


def _nominal_sparsity(state: CompressionState) -> float:
    sparsity = 0.0
    for entry in state.history:
        if "P" not in entry.get("kind", ""):
            continue
        nm = parse_pattern(entry.get("pattern", "unstructured"))
        target = 1 - nm[0] / nm[1] if nm else entry.get("sparsity", 0.0)
        sparsity = max(sparsity, target)
    return sparsity


def _nm_of(state: CompressionState) -> tuple[int, int] | None:
    for entry in reversed(state.history):
        if "P" in entry.get("kind", "") and entry.get("pattern", "unstructured") != "unstructured":
            return parse_pattern(entry["pattern"])
    return None


def layer_cost(module: nn.Module, state: CompressionState | None, b_orig: int = 16) -> LayerCost:
    """Bits that the real tensors of one compressed module need.

    Values: ``bits`` of the recorded grid, or ``b_orig`` when not quantized. Grid overhead: an
    fp16 scale per group, plus a ``bits``-bit zero point per group when asymmetric. Sparse
    storage is used when it is smaller than dense: the nonzero values plus a 1-bit mask per
    weight (unstructured) or ``ceil(log2 M)`` index bits per kept weight (N:M).
    """
    weight = module.weight.detach()
    numel, nonzero = weight.numel(), int((weight != 0).sum())
    if state is None:  # an uncompressed layer: dense at the original precision
        return LayerCost(numel, nonzero, b_orig, numel * b_orig, 0.0, 0.0)
    bits = state.bits if state.bits is not None else b_orig
    overhead = 0.0
    if state.scale is not None:
        n_groups = state.scale.numel()
        overhead += n_groups * (SCALE_BITS + (0 if state.symmetric else bits))
    dense = numel * bits
    nm = _nm_of(state)
    if nm is not None:
        index_bits = nonzero * math.ceil(math.log2(nm[1]))
    else:
        index_bits = numel  # a bitmask
    sparse = nonzero * bits + index_bits
    if state.mask is not None and sparse < dense:
        payload, overhead = nonzero * bits, overhead + index_bits
    else:
        payload = dense
    return LayerCost(numel, nonzero, bits, payload, overhead, _nominal_sparsity(state))


def original_weights(module: nn.Module, state: CompressionState | None) -> int:
    """How many weights of the original model a layer stands for: its own size, or, for a
    factor of a low-rank factorisation (basis sharing), the ``original_weights`` its stage
    recorded (a layer's original ``out * in`` on its coefficients, 0 on a shared basis)."""
    for entry in reversed(state.history if state is not None else []):
        if "original_weights" in entry:
            return int(entry["original_weights"])
    return module.weight.numel()


@dataclass(frozen=True)
class CompressionSummary:
    """Compression of a model's compressible weights.

    Counted: every linear/conv layer that a stage would target by default (embeddings and the
    LM head excluded), every layer that carries a compression state, and the weights of blocks
    or channels removed by structured pruning (stored in 0 bits). Uncompressed layers count at
    ``B_orig`` bits. The factors of a shared-basis factorisation count as the original weights
    they replace (:func:`original_weights`; a shared basis once) and are stored at their own
    precision. Unmerged LoRA adapters add their weights at ``B_orig`` bits to the storage
    (nominal and measured).

    Attributes:
        n_layers: layers that carry a compression state.
        n_weights: original number of weights counted.
        sparsity: measured fraction of exactly-zero weights among the stored ones (removed
            weights count as zeros).
        avg_bits: mean value bits per stored weight (``B_orig`` for unquantized layers).
        nominal_C: ``B_orig / ((1 - p) * B_Q)`` from the stages' targets, weighted by size.
        measured_C: ``B_orig * n_weights`` / bits of values, scales, zeros and mask/index.
        bits_per_weight: measured storage bits per original weight, overhead included.
    """

    n_layers: int
    n_weights: int
    sparsity: float
    avg_bits: float
    nominal_C: float
    measured_C: float
    bits_per_weight: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def compression_summary(model: nn.Module, b_orig: int = 16) -> CompressionSummary:
    """Measure the compression of ``model`` from its tensors and recorded states.

    All rates are 1.0 for an uncompressed model.
    """
    try:
        layers = dict(resolve_targets(model))
    except PPQConfigError:
        layers = {}
    states = {name: state for name, _, state in compressed_modules(model)}
    layers.update({n: m for n, m in model.named_modules() if n in states and is_compressible(m)})
    costs = [layer_cost(m, states.get(n), b_orig) for n, m in layers.items()]
    removed = sum(
        int(entry.get("removed_weights", 0)) for state in states.values() for entry in state.history
    )
    n = sum(original_weights(m, states.get(name)) for name, m in layers.items()) + removed
    kept = sum(c.numel for c in costs)  # weights stored (factors included)
    if n == 0:
        return CompressionSummary(0, 0, 0.0, float(b_orig), 1.0, 1.0, float(b_orig))
    adapters = sum(  # unmerged LoRA adapters: extra weights at the original precision
        int(entry.get("adapter_weights", 0)) for state in states.values() for entry in state.history
    )
    stored = sum(c.payload_bits + c.overhead_bits for c in costs) + adapters * b_orig
    nominal_bits = sum(c.numel * (1 - c.nominal_sparsity) * c.value_bits for c in costs)
    nominal_bits += adapters * b_orig
    return CompressionSummary(
        n_layers=sum(1 for name in layers if name in states),
        n_weights=n,
        sparsity=1 - sum(c.nonzero for c in costs) / max(kept + removed, 1),
        avg_bits=sum(c.numel * c.value_bits for c in costs) / max(kept, 1),
        nominal_C=b_orig * n / nominal_bits if nominal_bits else float("inf"),
        measured_C=b_orig * n / stored if stored else float("inf"),
        bits_per_weight=stored / n,
    )


def metric_value(value: float, higher_is_better: bool) -> float:
    """Turn a logged value into the higher-is-better metric ``M`` (``-ppl`` for perplexity)."""
    return value if higher_is_better else -value


def pih_order(single_stage_metric: dict[str, float]) -> list[str]:
    """The order the Progressive Intensity Hypothesis predicts: weaker perturbation first.

    Args:
        single_stage_metric: ``M`` of the model after each stage applied alone, by stage name.

    Returns:
        Stage names sorted from the weakest perturbation (highest ``M``) to the strongest;
        ties keep the given order.
    """
    return sorted(single_stage_metric, key=lambda name: -single_stage_metric[name])


def compression_equivalence_ratio(curve: Sequence[tuple[float, float]], metric: float) -> float:
    """The Compression Equivalence Ratio ``C*_f``: the quantization ratio ``C_Q`` at which
    quantization alone reaches the metric ``M(f(phi)) = metric`` of a method ``f``.

    Interpolated linearly in ``log C`` between the two measured points of the
    quantization-only curve that bracket ``metric``, walking from the mildest point (usually
    the dense model, ``C = 1``) towards stronger quantization.

    Args:
        curve: ``(C_Q, M)`` points of quantization alone (e.g. ``(1, M_dense)``,
            ``(2, M_8bit)``, ... ``(8, M_2bit)``), in any order, at least two.
        metric: ``M`` of the method, higher is better.

    Returns:
        ``C*_f``. At the ends: the mildest point's ``C`` when ``metric`` is at least as good as
        it (``f`` costs nothing quantization would notice); ``math.inf`` when ``metric`` is
        worse than the strongest point (``f`` hurts more than any quantization measured). On a
        non-monotone curve, the first crossing from the mild end is returned.

    Raises:
        PPQConfigError: with fewer than two points, repeated ratios, or a non-finite value.
    """
    points = sorted((float(c), float(m)) for c, m in curve)
    values = [v for point in points for v in point] + [float(metric)]
    if len(points) < 2 or not all(math.isfinite(v) for v in values):
        raise PPQConfigError(
            f"curve={curve!r}, metric={metric!r}: the quantization-only curve needs at least "
            "two finite (C_Q, M) points and a finite metric."
        )
    if len({c for c, _ in points}) < len(points) or points[0][0] <= 0:
        raise PPQConfigError(f"curve={curve!r}: the ratios C_Q must be positive and distinct.")
    if metric >= points[0][1]:
        return points[0][0]
    for (c1, m1), (c2, m2) in itertools.pairwise(points):
        if m2 <= metric <= m1:  # the first segment that falls through the metric
            t = (m1 - metric) / (m1 - m2) if m1 != m2 else 0.0
            return math.exp(math.log(c1) + t * (math.log(c2) - math.log(c1)))
    return math.inf
