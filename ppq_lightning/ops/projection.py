"""Projection of a weight onto a recorded compressed state: its mask, then its grid."""

from __future__ import annotations

from torch import Tensor

from ppq_lightning.ops.quant_grid import QuantGrid


def project(w: Tensor, mask: Tensor | None = None, grid: QuantGrid | None = None) -> Tensor:
    """The point of the compressed set nearest ``w`` per entry: pruned entries (``mask`` False)
    become exactly 0, and every entry is rounded onto ``grid`` (which holds 0 exactly, so the
    zeros stay).

    Used after a weight was updated (a fine-tuning step, a merged LoRA update) to put it back
    on the state recorded by earlier stages.

    Args:
        w: weight matrix ``(out, in)``.
        mask: bool ``(out, in)``, True = kept; None when the layer was never pruned.
        grid: the recorded quantization grid; None when the layer was never quantized.

    Returns:
        A new tensor (``w`` itself when there is neither mask nor grid).
    """
    if mask is not None:
        w = w * mask.to(w.device)
    if grid is not None:
        w = grid.to(w.device).fake_quantize(w)
    return w
