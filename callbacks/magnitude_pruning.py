"""Magnitude pruning: zero the weights of smallest absolute value."""

from __future__ import annotations

from typing import Any

from torch import nn

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.layers import weight_matrix
from ppq_lightning.ops.masks import (
    check_sparsity,
    global_masks,
    nm_mask,
    parse_pattern,
    row_mask,
    unstructured_mask,
)
from ppq_lightning.state import current_mask, record_mask, record_stage

SCOPES = ("layer", "row", "global")


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


class MagnitudePruning(CompressionCallback):
    """Prune the weights of smallest magnitude ``|W|``.

    Fires once, before the first evaluation (``validate``/``test``) or at the start of ``fit``.
    ``sparsity`` is the target fraction of zeros in each layer *including* zeros left by earlier
    stages: weights pruned before stay pruned and count towards it (no regrowth). On a
    quantized layer the survivors are untouched, so they stay on the recorded grid.

    Args:
        sparsity: target fraction of pruned weights, in [0, 1). Optional for ``N:M`` (where it
            is ``1 - N/M``); if given it must equal that.
        pattern: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive input weights,
            e.g. ``"2:4"``).
        scope: for unstructured pruning, where the threshold is taken: ``"layer"`` (each layer
            reaches ``sparsity``), ``"row"`` (each output row does), or ``"global"`` (one
            threshold across all targeted layers).
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: sparsity outside [0, 1), a pattern other than "unstructured"/"N:M",
            sparsity contradicting N:M, an unknown scope, or (at run time) an input dimension
            that is not a multiple of M.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.MagnitudePruning
              init_args: {sparsity: 0.5, pattern: unstructured, scope: layer}
    """

    label = "magnitude"
    kind = "P"

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        scope: str = "layer",
        **kwargs: Any,
    ) -> None:
        sparsity, nm = resolve_sparsity(sparsity, pattern)
        if scope not in SCOPES:
            raise bad_value("scope", scope, f"one of {', '.join(SCOPES)}")
        super().__init__(**kwargs)
        self.sparsity, self.pattern, self.scope, self._nm = sparsity, pattern, scope, nm

    def stage_config(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": self.pattern, "scope": self.scope}

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        scores = {n: weight_matrix(m).abs() for n, m in modules.items()}  # (out, in)
        keeps = {n: current_mask(m) for n, m in modules.items()}
        if self._nm is not None:
            masks = {n: nm_mask(scores[n], *self._nm, keep=keeps[n]) for n in modules}
        elif self.scope == "global":
            names = list(modules)
            found = global_masks(
                [scores[n] for n in names], self.sparsity, [keeps[n] for n in names]
            )
            masks = dict(zip(names, found, strict=True))
        else:
            make = unstructured_mask if self.scope == "layer" else row_mask
            masks = {n: make(scores[n], self.sparsity, keep=keeps[n]) for n in modules}
        entry = self.history_entry()
        layers = {}
        for name, module in modules.items():
            state = record_mask(module, masks[name])
            record_stage(module, entry)
            layers[name] = {"sparsity": 1 - state.mask.float().mean().item()}
        return layers
