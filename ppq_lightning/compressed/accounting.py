"""Compression rates, as defined in ``docs/definitions.md``, measured from the real tensors.

- Nominal compression rate of one method: ``C_P = 1 / (1 - p)``, ``C_Q = B_orig / B_Q``; of a
  schedule: their product, i.e. ``B_orig / ((1 - p) * B_Q)``.
- Measured compression rate: ``B_orig`` bits per original weight divided by the bits the real
  tensors need, counting values, scales, zero points and the mask (or N:M index) overhead.

The order metrics built on them (``G``, ``A``, ``C*``) live in ``ppq_lightning.order.metrics``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ppq_lightning.compressed.history import kind_of
from ppq_lightning.compressed.state import CompressionState, compressed_modules
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.offload import released
from ppq_lightning.modules.targets import resolve_targets, untaken_layers
from ppq_lightning.modules.views import is_compressible
from ppq_lightning.ops.masks import parse_pattern
from ppq_lightning.ops.storage import weight_storage


def nominal_compression_rate(
    sparsity: float = 0.0, bits: float | None = None, b_orig: int = 16
) -> float:
    """``C = 1/(1-p) * B_orig/B_Q`` (``bits=None`` means not quantized: ``B_Q = B_orig``)."""
    return 1.0 / (1.0 - sparsity) * b_orig / (bits if bits is not None else b_orig)


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
        kind = kind_of(entry)
        if kind is None or not kind.prunes:
            continue
        nm = parse_pattern(entry.get("pattern", "unstructured"))
        target = 1 - nm[0] / nm[1] if nm else entry.get("sparsity", 0.0)
        sparsity = max(sparsity, target)
    return sparsity


def _nm_of(state: CompressionState) -> tuple[int, int] | None:
    for entry in reversed(state.history):
        kind = kind_of(entry)
        if (
            kind is not None
            and kind.prunes
            and entry.get("pattern", "unstructured") != "unstructured"
        ):
            return parse_pattern(entry["pattern"])
    return None


def layer_cost(module: nn.Module, state: CompressionState | None, b_orig: int = 16) -> LayerCost:
    """Bits that the real tensors of one compressed module need.

    Values: ``bits`` of the recorded grid, or ``b_orig`` when not quantized. Grid overhead:
    what the grid stores besides its values (``Grid.overhead_bits``): for an integer grid an
    fp16 scale per group, plus a ``bits``-bit zero point per group when asymmetric; for NVFP4 an
    E4M3 scale per 16 weights and a float32 global scale, for MXFP4 an E8M0 scale per 32, for
    FP8 a float32 scale per row or 128 x 128 block; for a K-quant its fp16 super-scales and
    6-bit (Q6_K: 8-bit) sub-block scales and mins. Sparse
    storage is used when it is smaller than dense: the nonzero values plus a 1-bit mask per
    weight (unstructured) or ``ceil(log2 M)`` index bits per kept weight (N:M).
    """
    weight = module.weight.detach()
    numel, nonzero = weight.numel(), int((weight != 0).sum())
    released(module)  # weights on disk: its pages (weight, mask, grid) leave memory again
    if state is None:  # an uncompressed layer: dense at the original precision
        return LayerCost(numel, nonzero, b_orig, numel * b_orig, 0.0, 0.0)
    bits = state.bits if state.bits is not None else b_orig
    nm = _nm_of(state)
    grid = state.grid
    storage = weight_storage(
        numel,
        bits,
        nonzero=nonzero if state.mask_bits is not None else None,  # never unpacked here
        grid_overhead=grid.overhead_bits() if grid is not None else 0.0,
        nm_m=nm[1] if nm is not None else None,
    )
    payload, overhead = storage.payload_bits, storage.overhead_bits
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

    Counted: every linear/conv layer that a stage would target by default (embeddings, the LM
    head and the model's other boundary layers excluded: ``modules.targets.resolve_targets``),
    every layer that carries a compression state, and the weights of blocks or channels removed
    by structured pruning (stored in 0 bits); and, dense at ``B_orig`` bits, the weights of
    layers of a type no method takes (``modules.targets.untaken_layers``: a transposed
    convolution, a recurrent layer, a user's own layer with a ``weight`` Parameter), so that C
    is the compression of every weight the default targets could not leave out by rule, not of
    the layers that happened to be compressible. An ``nn.MultiheadAttention``'s query, key and
    value projections count as the layers they are (``modules.attention``: every row of its
    ``in_proj_weight``). Uncompressed layers count at ``B_orig`` bits. The factors of a
    shared-basis factorisation count as the original weights they replace
    (:func:`original_weights`; a shared basis once) and are stored at their own precision.
    Unmerged LoRA adapters add their weights at ``B_orig`` bits to the storage (nominal and
    measured).

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


def counted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights the compression rate counts: every layer a stage targets by
    default (not embeddings, the LM head, the model's output layer and stem as
    ``modules.boundary`` knows them) and every layer that carries a compression state."""
    try:
        layers = dict(resolve_targets(model, include_computed=True))
    except PPQConfigError:
        layers = {}
    states = {name for name, _, _ in compressed_modules(model)}
    layers.update({n: m for n, m in model.named_modules() if n in states and is_compressible(m)})
    return layers


def compression_summary(model: nn.Module, b_orig: int = 16) -> CompressionSummary:
    """Measure the compression of ``model`` from its tensors and recorded states.

    All rates are 1.0 for an uncompressed model.
    """
    layers = counted_layers(model)
    states = {name: state for name, _, state in compressed_modules(model)}
    costs = [layer_cost(m, states.get(n), b_orig) for n, m in layers.items()]
    costs += [  # layers no method takes: dense, every weight counted as nonzero
        LayerCost(count, count, b_orig, count * b_orig, 0.0, 0.0)
        for name, count in untaken_layers(model).items()
        if name not in layers
    ]
    removed = sum(
        int(entry.get("removed_weights", 0)) for state in states.values() for entry in state.history
    )
    n = sum(original_weights(m, states.get(name)) for name, m in layers.items()) + removed
    n += sum(c.numel for c in costs[len(layers) :])  # the layers no method takes
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
