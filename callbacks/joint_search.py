"""Structured pruning and mixed precision chosen together, under one budget of measured C."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import batch_input, calibration_batches
from ppq_lightning.calibration.engine import observing
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.compressed.accounting import SCALE_BITS
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import record_grid, record_stage
from ppq_lightning.edits.channels import apply_channel_edits, mlp_inputs, plan_channel_edits
from ppq_lightning.errors import PPQConfigError, bad_value, check_int, check_number
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import set_weight_matrix, weight_matrix
from ppq_lightning.ops.allocation import best_move
from ppq_lightning.ops.channels import channel_importance, keep_most_important
from ppq_lightning.ops.quant_grid import check_bits, compute_grid
from ppq_lightning.ops.reconstruction import relative_weight_error
from ppq_lightning.order.interference import reference_score


class JointStructuralMixedPrecision(CompressionCallback):
    """Choose every layer's bit width and every MLP's kept share of channels in one search,
    against one budget of measured C, scored on the whole model's output.

    Units: the bit width of every target layer (``bits``, mildest first) and the kept share of
    the intermediate channels of every MLP among the targets (``keep``, starting at 1.0;
    channels ranked by ``E[x_j^2] ||W_out[:, j]||^2`` on the dense calibration inputs). The
    search starts with every layer at ``bits[0]`` and every MLP whole, and moves one unit one
    level at a time, the move that adds the least loss per bit of storage saved (a greedy
    multiple-choice knapsack), until the estimated measured C reaches ``budget``. The loss of
    a move is *measured*: the KL divergence of the model's outputs from the dense model's on
    ``score_batches`` calibration batches, with the move applied on top of the moves already
    made (global error propagation, not a per-layer proxy). Candidates are emulated in place
    (fake-quantized weights, zeroed channel columns: the same function as the edited model)
    and undone; after a move the moved unit is re-measured, and every ``rescore_every`` moves
    all of them are. The chosen configuration is then applied for real: the channels are
    removed (``ChannelPruning``'s recorded edits: a checkpoint replays them on load) and each
    layer is rounded to its bits on a per-channel asymmetric grid (recorded), with the stage,
    its bits and kept share in each layer's history. Per-layer metrics: ``bits``, ``keep``,
    ``weight_error``; the stage's summary has the measured C.

    Args:
        budget: the measured compression rate to reach, > 1.
        bits: the bit widths a layer may take, each 2-8, mildest (largest) first.
        keep: the kept shares of MLP channels, in (0, 1], starting at 1.0 (``[1.0]``: bits
            only).
        num_calibration_batches: calibration batches for the channel statistics.
        score_batches: calibration batches the loss of a move is measured on.
        rescore_every: moves between two measurements of every unit.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: ``budget`` not > 1; a bit width outside 2-8, unsorted or repeated;
            ``keep`` not starting at 1.0, unsorted or outside (0, 1]; bad batch counts; at run
            time (before any weight changes) a budget that even the strongest levels miss
            (named with the largest reachable C), or ``keep`` below 1 without an MLP layout.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.JointStructuralMixedPrecision
              init_args: {budget: 5.0, bits: [8, 4, 3], keep: [1.0, 0.75, 0.5]}
    """

    default_name = "joint"
    edits_structure = True
    kind = StageKind.PRUNE_QUANTIZE

    def __init__(
        self,
        budget: float,
        bits: list[int] | None = None,
        keep: list[float] | None = None,
        num_calibration_batches: int = 16,
        score_batches: int = 4,
        rescore_every: int = 16,
        **kwargs: Any,
    ) -> None:
        check_number("budget", budget, low=1, low_open=True)
        bits = [8, 6, 4, 3, 2] if bits is None else bits
        keep = [1.0, 0.875, 0.75, 0.625, 0.5] if keep is None else keep
        if not isinstance(bits, list) or not bits:
            raise bad_value("bits", bits, "a non-empty list of bit widths, largest first")
        for b in bits:
            check_bits(b, "bits")
        if bits != sorted(set(bits), reverse=True):
            raise bad_value("bits", bits, "distinct bit widths, largest first")
        if not isinstance(keep, list) or not keep or keep[0] != 1.0:
            raise bad_value("keep", keep, "a list of kept shares starting at 1.0")
        for k in keep:
            check_number("keep", k, 0, 1, low_open=True)
        if keep != sorted(set(keep), reverse=True):
            raise bad_value("keep", keep, "distinct shares, largest first")
        check_int("num_calibration_batches", num_calibration_batches, minimum=1)
        check_int("score_batches", score_batches, minimum=1)
        check_int("rescore_every", rescore_every, minimum=1)
        super().__init__(**kwargs)
        self.budget, self.bits, self.keep = float(budget), list(bits), [float(k) for k in keep]
        self.num_calibration_batches, self.score_batches = num_calibration_batches, score_batches
        self.rescore_every = rescore_every
        self.search_log: list[dict[str, float]] = []

    def stage_config(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "bits": self.bits,
            "keep": self.keep,
            "score_batches": self.score_batches,
            "rescore_every": self.rescore_every,
        }

    # -- storage of a configuration -----------------------------------------------------------
    def _storage(self, shapes: dict[str, tuple[int, int]], levels: dict[str, int]) -> float:
        """Estimated bits of the target layers: values plus an fp16 scale and a ``b``-bit zero
        per row (as ``compressed.accounting`` counts them), removed channels at 0 bits."""
        total = 0.0
        for name, (rows, cols) in shapes.items():
            b = self.bits[levels[name]]
            rows, cols = rows * self._row_share(name, levels), cols * self._col_share(name, levels)
            total += rows * cols * b + rows * (SCALE_BITS + b)
        return total

    def _row_share(self, name: str, levels: dict[str, int]) -> float:
        down = self._producer_of.get(name)
        return 1.0 if down is None else self.keep[levels[f"keep:{down}"]]

    def _col_share(self, name: str, levels: dict[str, int]) -> float:
        return self.keep[levels[f"keep:{name}"]] if f"keep:{name}" in levels else 1.0

    # -- the search ---------------------------------------------------------------------------
    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        start = time.perf_counter()
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in modules.items()}
        downs = self._mlp_outputs(model, modules) if len(self.keep) > 1 else {}
        levels = {n: 0 for n in modules} | {f"keep:{d}": 0 for d in downs}
        last = {n: len(self.bits) - 1 for n in modules} | {
            f"keep:{d}": len(self.keep) - 1 for d in downs
        }
        self._producer_of = {p: d for d in downs for p in self._producers(model, d)}
        original = sum(r * c for r, c in shapes.values()) * self.b_orig
        strongest = original / self._storage(shapes, last)
        if strongest < self.budget:
            raise bad_value(
                "budget",
                self.budget,
                f"a measured C these levels can reach (at most about {strongest:.2f} with "
                f"bits={self.bits[-1]} everywhere and keep={self.keep[-1]})",
            )
        batches = calibration_batches(self.trainer, self.num_calibration_batches, self.dataloader)
        if not batches:
            raise PPQConfigError(f"{self.name}: no calibration batches to score the search on.")
        scores = self._channel_scores(model, modules, downs, batches)
        score = reference_score(model, batches[: self.score_batches], "calibration_kl")
        weights = {n: weight_matrix(m).detach().clone() for n, m in modules.items()}

        def emulate(name: str) -> None:
            """Write layer ``name`` as the current levels make it (fake-quantized, columns of
            removed channels zeroed)."""
            w = weights[name]
            kept = self._kept_columns(name, levels, scores)
            q = torch.zeros_like(w)
            columns = w if kept is None else w[:, kept]
            grid = compute_grid(columns.float(), self.bits[levels[name]])
            quantized = grid.fake_quantize(columns.float()).to(w.dtype)
            if kept is None:
                q = quantized
            else:
                q[:, kept] = quantized
            set_weight_matrix(modules[name], q)

        def layer_of(unit: str) -> str:
            return unit.removeprefix("keep:")

        def loss_after(unit: str) -> float:
            levels[unit] += 1
            emulate(layer_of(unit))
            loss = score(model)
            levels[unit] -= 1
            emulate(layer_of(unit))
            return loss

        def saved_bits(unit: str) -> float:
            before = self._storage(shapes, levels)
            levels[unit] += 1
            after = self._storage(shapes, levels)
            levels[unit] -= 1
            return before - after

        for name in modules:
            emulate(name)
        current = score(model)
        deltas: dict[str, float] = {}
        moves = 0
        while original / self._storage(shapes, levels) < self.budget:
            if moves % self.rescore_every == 0:
                deltas = {u: loss_after(u) - current for u in levels if levels[u] < last[u]}
            unit = best_move(levels, last, deltas, saved_bits)
            if unit is None:  # cannot happen below the strongest levels; kept as a guard
                raise PPQConfigError(f"{self.name}: no move reaches budget={self.budget}.")
            levels[unit] += 1
            emulate(layer_of(unit))
            current = score(model)
            moves += 1
            if levels[unit] < last[unit]:
                deltas[unit] = loss_after(unit) - current
            else:
                deltas.pop(unit, None)
            self.search_log.append(
                {"move": moves, "kl": current, "C": original / self._storage(shapes, levels)}
            )
        for name, module in modules.items():  # back to the dense weights, then edit for real
            set_weight_matrix(module, weights[name])
        layers = self._apply(model, modules, downs, levels, scores, weights)
        self.search_seconds = time.perf_counter() - start
        return layers

    # -- pieces ---------------------------------------------------------------------------
    @staticmethod
    def _mlp_outputs(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
        """The MLP output projections among the targets whose producers are targets too."""
        downs = []
        for name in modules:
            parent, attribute = parent_of(model, name)
            inputs = mlp_inputs(parent, attribute)
            prefix = name.rpartition(".")[0]
            if inputs and all(f"{prefix}.{i}" in modules for i in inputs):
                downs.append(name)
        if not downs:
            raise PPQConfigError(
                "JointStructuralMixedPrecision: keep below 1.0 needs MLPs (gate/up/down, "
                "fc1/fc2, c_fc/c_proj) among the targets; give keep=[1.0] for bits only."
            )
        return downs

    @staticmethod
    def _producers(model: nn.Module, down: str) -> list[str]:
        parent, attribute = parent_of(model, down)
        prefix = down.rpartition(".")[0]
        return [f"{prefix}.{i}" for i in mlp_inputs(parent, attribute)]

    def _kept_columns(
        self, name: str, levels: dict[str, int], scores: dict[str, Tensor]
    ) -> Tensor | None:
        unit = f"keep:{name}"
        if unit not in levels or levels[unit] == 0:
            return None
        return keep_most_important(scores[name], 1 - self.keep[levels[unit]])

    def _channel_scores(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        downs: list[str],
        batches: list[Any],
    ) -> dict[str, Tensor]:
        """``E[x_j^2] ||W_out[:, j]||^2`` of every MLP output projection, on the dense model
        (``E[x_j^2]`` is the engine's ``act_norm`` statistic, as Wanda's)."""
        statistics = LayerStatistics("act_norm")
        projections = {d: modules[d] for d in downs}
        with torch.no_grad(), evaluating(model), observing(projections, statistics.observe):
            for batch in batches:
                model(batch_input(batch))
        means = statistics.take(downs)
        return {d: channel_importance(means[d], weight_matrix(modules[d]).float()) for d in downs}

    def _apply(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        downs: list[str],
        levels: dict[str, int],
        scores: dict[str, Tensor],
        weights: dict[str, Tensor],
    ) -> dict[str, dict[str, float]]:
        entry = self.history_entry()
        for down in downs:
            share = self.keep[levels[f"keep:{down}"]]
            if share < 1.0:
                parent, attribute = parent_of(model, down)
                edits = plan_channel_edits(parent, attribute, scores[down], 1 - share)
                apply_channel_edits(parent, edits, entry)
        layers = {}
        for name, module in modules.items():
            bits = self.bits[levels[name]]
            w = weight_matrix(module)
            grid = compute_grid(w.float(), bits)
            q = grid.fake_quantize(w.float()).to(w.dtype)
            error = relative_weight_error(w, q)
            set_weight_matrix(module, q)
            record_grid(module, grid)
            share = self._col_share(name, levels) * self._row_share(name, levels)
            record_stage(module, {**entry, "layer_bits": bits, "layer_keep": share})
            layers[name] = {"bits": float(bits), "keep": share, "weight_error": error}
        return layers
