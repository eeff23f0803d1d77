"""Structured pruning and mixed precision chosen together, under one budget of measured C."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration.capture import evaluating, example_input
from ppq_lightning.calibration.data import calibration_batches
from ppq_lightning.calibration.engine import observing
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import record_grid, record_stage
from ppq_lightning.edits.channel_units import ChannelUnit, depgraph_units, mlp_units
from ppq_lightning.edits.channels import apply_channel_edits, mlp_inputs, plan_channel_edits
from ppq_lightning.edits.depgraph import attention_heads, prune_chosen_channels
from ppq_lightning.errors import PPQConfigError, bad_value, check_choice, check_int, check_number
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import set_weight_matrix, weight_matrix
from ppq_lightning.ops.allocation import best_move
from ppq_lightning.ops.channels import channel_importance
from ppq_lightning.ops.quant_grid import check_bits, compute_grid
from ppq_lightning.ops.reconstruction import relative_weight_error
from ppq_lightning.ops.storage import weight_storage
from ppq_lightning.order.interference import reference_score

CHANNELS = ("auto", "mlp", "depgraph")


@dataclass(frozen=True, kw_only=True)
class JointSearchConfig(StageConfig):
    """The joint search's arguments (see :class:`JointStructuralMixedPrecision`); ``bits`` and
    ``keep`` are stored with their defaults filled in.

    Raises:
        PPQConfigError: see :class:`JointStructuralMixedPrecision`.
    """

    budget: float
    bits: list[int] | None = None
    keep: list[float] | None = None
    num_calibration_batches: int = 16
    score_batches: int = 4
    rescore_every: int = 16
    channels: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("budget", self.budget, low=1, low_open=True)
        bits = [8, 6, 4, 3, 2] if self.bits is None else self.bits
        keep = [1.0, 0.875, 0.75, 0.625, 0.5] if self.keep is None else self.keep
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
        object.__setattr__(self, "bits", list(bits))
        object.__setattr__(self, "keep", [float(k) for k in keep])
        check_int("num_calibration_batches", self.num_calibration_batches, minimum=1)
        check_int("score_batches", self.score_batches, minimum=1)
        check_int("rescore_every", self.rescore_every, minimum=1)
        check_choice("channels", self.channels, CHANNELS)


class JointStructuralMixedPrecision(CompressionCallback):
    """Choose every layer's bit width and every channel unit's kept share in one search,
    against one budget of measured C, scored on the whole model's output.

    Units: the bit width of every target layer (``bits``, mildest first) and the kept share
    (``keep``, starting at 1.0) of every channel unit (``edits.channel_units``): with
    ``channels="mlp"`` the intermediate channels of every transformer MLP among the targets
    (ranked by ``E[x_j^2] ||W_out[:, j]||^2`` on the dense calibration inputs); with
    ``channels="depgraph"`` every coupled channel group of a CNN from Torch-Pruning's dependency
    graph (a convolution's output channels with their BatchNorm channels, the readers' input
    channels and, through residual additions, the coupled layers; ranked by the group's L2
    norm, as ``DepGraphPruning``; the model's ``default_ignore`` layers keep their output
    channels); ``"auto"`` takes MLPs when the targets have any, else coupled groups. The
    search starts with every layer at ``bits[0]`` and every unit whole, and moves one unit one
    level at a time, the move that adds the least loss per bit of storage saved (a greedy
    multiple-choice knapsack), until the estimated measured C reaches ``budget``. The loss of
    a move is *measured*: the KL divergence of the model's outputs from the dense model's on
    ``score_batches`` calibration batches, with the move applied on top of the moves already
    made (global error propagation, not a per-layer proxy). Candidates are emulated in place
    (fake-quantized weights, the readers' columns of removed channels zeroed: the same
    function as the edited model) and undone; after a move the moved unit is re-measured, and
    every ``rescore_every`` moves all of them are. The chosen configuration is then applied for
    real: the channels are removed (recorded edits, as ``ChannelPruning`` and
    ``DepGraphPruning`` record them: a checkpoint replays them on load) and each layer is
    rounded to its bits on a per-channel asymmetric grid (recorded), with the stage, its bits
    and kept share of weights in each layer's history. Per-layer metrics: ``bits``, ``keep``,
    ``weight_error``; the stage's summary has the measured C.

    Args:
        budget: the measured compression rate to reach, > 1.
        bits: the bit widths a layer may take, each 2-8, mildest (largest) first.
        keep: the kept shares of each channel unit, in (0, 1], starting at 1.0 (``[1.0]``:
            bits only).
        num_calibration_batches: calibration batches for the channel statistics.
        score_batches: calibration batches the loss of a move is measured on.
        rescore_every: moves between two measurements of every unit.
        channels: which channel units: ``"auto"``, ``"mlp"`` or ``"depgraph"``.
        **kwargs: ``targets``, ``ignore``, ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: ``budget`` not > 1; a bit width outside 2-8, unsorted or repeated;
            ``keep`` not starting at 1.0, unsorted or outside (0, 1]; bad batch counts or
            ``channels``; at run time (before any weight changes) a budget that even the
            strongest levels miss (named with the largest reachable C), or ``keep`` below 1
            without a channel unit (``channels="mlp"`` without an MLP layout).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.JointStructuralMixedPrecision
              init_args: {budget: 5.0, bits: [8, 4, 3], keep: [1.0, 0.75, 0.5]}
    """

    default_name = "joint"
    config_class = JointSearchConfig
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
        channels: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            budget=budget,
            bits=bits,
            keep=keep,
            num_calibration_batches=num_calibration_batches,
            score_batches=score_batches,
            rescore_every=rescore_every,
            channels=channels,
            **kwargs,
        )
        self.search_log: list[dict[str, float]] = []

    # -- storage of a configuration -----------------------------------------------------------
    def _removed_counts(self, levels: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Matrix rows and columns each layer loses at ``levels``."""
        counts: dict[str, tuple[int, int]] = {}
        for unit in self._units:
            for layer, (rows, cols) in unit.layers[levels[unit.name]].items():
                r, c = counts.get(layer, (0, 0))
                counts[layer] = (r + rows.numel(), c + cols.numel())
        return counts

    def _storage(self, shapes: dict[str, tuple[int, int]], levels: dict[str, int]) -> float:
        """Estimated bits of the target layers: values plus an fp16 scale and a ``b``-bit zero
        per row (as ``compressed.accounting`` counts them), removed channels at 0 bits."""
        removed, total = self._removed_counts(levels), 0.0
        for name, (rows, cols) in shapes.items():
            b = self.bits[levels[name]]
            lost_rows, lost_cols = removed.get(name, (0, 0))
            rows, cols = rows - lost_rows, cols - lost_cols
            total += weight_storage(rows * cols, b, groups=rows, symmetric=False).total_bits
        return total

    # -- the search ---------------------------------------------------------------------------
    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        start = time.perf_counter()
        batches = calibration_batches(self.trainer, self.num_calibration_batches, self.dataloader)
        if not batches:
            raise PPQConfigError(f"{self.name}: no calibration batches to score the search on.")
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in modules.items()}
        self._units, traced = self._channel_units(model, modules, batches)
        levels = {n: 0 for n in modules} | {u.name: 0 for u in self._units}
        last = {n: len(self.bits) - 1 for n in modules} | {
            u.name: len(self.keep) - 1 for u in self._units
        }
        original = sum(r * c for r, c in shapes.values()) * self.b_orig
        strongest = original / self._storage(shapes, last)
        if strongest < self.budget:
            raise bad_value(
                "budget",
                self.budget,
                f"a measured C these levels can reach (at most about {strongest:.2f} with "
                f"bits={self.bits[-1]} everywhere and keep={self.keep[-1]})",
            )
        score = reference_score(
            model, batches[: self.score_batches], "calibration_kl", self.forward_fn
        )
        # every layer a search writes: the targets and the consumers of channel units
        layers = dict(modules) | {
            n: model.get_submodule(n)
            for u in self._units
            for removal in u.layers
            for n, (_, cols) in removal.items()
            if cols.numel()
        }
        weights = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
        readers = {  # the units that remove columns of each layer
            n: [u for u in self._units if any(n in r and r[n][1].numel() for r in u.layers)]
            for n in layers
        }
        writes = {u.name: [n for n in layers if u in readers[n]] for u in self._units}

        def emulate(name: str) -> None:
            """Write layer ``name`` as the current levels make it: removed columns zeroed, the
            rest fake-quantized on the grid of the kept columns (targets only)."""
            w = weights[name]
            removed = [u.layers[levels[u.name]].get(name) for u in readers[name]]
            removed = [r[1] for r in removed if r is not None and r[1].numel()]
            kept = None
            if removed:
                mask = torch.ones(w.shape[1], dtype=torch.bool)
                mask[torch.cat(removed)] = False
                kept = mask.nonzero().flatten().to(w.device)
            columns = w if kept is None else w[:, kept]
            if name in modules:
                grid = compute_grid(columns.float(), self.bits[levels[name]])
                columns = grid.fake_quantize(columns.float()).to(w.dtype)
            q = columns if kept is None else torch.zeros_like(w).index_copy_(1, kept, columns)
            set_weight_matrix(layers[name], q)

        def move(unit: str, step: int) -> None:
            levels[unit] += step
            for name in writes.get(unit, [unit]):  # a bit-width unit writes its own layer
                emulate(name)

        def loss_after(unit: str) -> float:
            move(unit, 1)
            loss = score(model)
            move(unit, -1)
            return loss

        def saved_bits(unit: str) -> float:
            before = self._storage(shapes, levels)
            levels[unit] += 1
            after = self._storage(shapes, levels)
            levels[unit] -= 1
            return before - after

        for name in layers:
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
            move(unit, 1)
            current = score(model)
            moves += 1
            if levels[unit] < last[unit]:
                deltas[unit] = loss_after(unit) - current
            else:
                deltas.pop(unit, None)
            self.search_log.append(
                {"move": moves, "kl": current, "C": original / self._storage(shapes, levels)}
            )
        for name, module in layers.items():  # back to the dense weights, then edit for real
            set_weight_matrix(module, weights[name])
        kept_share = self._kept_shares(shapes, levels)
        result = self._apply(model, modules, levels, kept_share, traced)
        self.search_seconds = time.perf_counter() - start
        return result

    # -- pieces ---------------------------------------------------------------------------
    def _channel_units(
        self, model: nn.Module, modules: dict[str, nn.Module], batches: list[Any]
    ) -> tuple[list[ChannelUnit], tuple[Any, Tensor] | None]:
        """The channel units of the search (none when ``keep`` is ``[1.0]``) and, for coupled
        groups, the dependency graph they come from with the input it was traced on."""
        if len(self.keep) == 1:
            return [], None
        downs = self._mlp_outputs(model, modules)
        kind = self.channels
        if kind == "auto":
            has_mlps = bool(downs or self._mlp_outputs(model, dict(model.named_modules())))
            kind = "mlp" if has_mlps else "depgraph"
        if kind == "mlp":
            if not downs:
                raise PPQConfigError(
                    "JointStructuralMixedPrecision: keep below 1.0 needs MLPs (gate/up/down, "
                    "fc1/fc2, c_fc/c_proj) among the targets; give keep=[1.0] for bits only, "
                    "or channels='depgraph' for a CNN."
                )
            scores = self._channel_scores(model, modules, downs, batches)
            return mlp_units(model, downs, scores, self.keep), None
        example = example_input(model, batches[0], self.forward_fn)
        example = example.to(next(model.parameters()).device)
        protected = set(getattr(model, "default_ignore", None) or ())
        ignored = [m for n, m in model.named_modules() if n in protected]
        with evaluating(model):
            units, graph = depgraph_units(
                model, example, ignored, self.keep, set(attention_heads(model))
            )
        units = [  # groups whose producers are all targets
            u
            for u in units
            if all(n in modules for n, (rows, _) in u.layers[-1].items() if rows.numel())
        ]
        if not units:
            raise PPQConfigError(
                "JointStructuralMixedPrecision: keep below 1.0 found no channel group to prune "
                "among the targets (a coupled group of convolutions, linear layers and "
                "BatchNorms whose producing layers are all targets); give keep=[1.0] for bits "
                "only."
            )
        return units, (graph, example)

    @staticmethod
    def _mlp_outputs(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
        """The MLP output projections among the targets whose producers are targets too."""
        downs = []
        for name in modules:
            if not name:
                continue
            parent, attribute = parent_of(model, name)
            inputs = mlp_inputs(parent, attribute)
            prefix = name.rpartition(".")[0]
            if inputs and all(f"{prefix}.{i}" in modules for i in inputs):
                downs.append(name)
        return downs

    def _kept_shares(
        self, shapes: dict[str, tuple[int, int]], levels: dict[str, int]
    ) -> dict[str, float]:
        """The kept share of each target layer's weights at ``levels``."""
        removed = self._removed_counts(levels)
        shares = {}
        for name, (rows, cols) in shapes.items():
            lost_rows, lost_cols = removed.get(name, (0, 0))
            shares[name] = (rows - lost_rows) * (cols - lost_cols) / (rows * cols)
        return shares

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
                self.model_forward(model, batch)
        means = statistics.take(downs)
        return {d: channel_importance(means[d], weight_matrix(modules[d]).float()) for d in downs}

    def _apply(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        levels: dict[str, int],
        kept_share: dict[str, float],
        traced: tuple[Any, Tensor] | None,
    ) -> dict[str, dict[str, float]]:
        entry = self.history_entry()
        chosen = [u for u in self._units if levels[u.name] > 0]
        if traced is not None:
            graph, example = traced
            removed = [(*u.root, u.removed[levels[u.name]].tolist()) for u in chosen]
            prune_chosen_channels(model, example, graph, removed, entry)
        for unit in chosen:  # MLP units
            if unit.root is None:
                down = unit.name.removeprefix("keep:")
                parent, attribute = parent_of(model, down)
                share = self.keep[levels[unit.name]]
                edits = plan_channel_edits(parent, attribute, unit.scores, 1 - share)
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
            share = kept_share[name]
            record_stage(module, {**entry, "layer_bits": bits, "layer_keep": share})
            layers[name] = {"bits": float(bits), "keep": share, "weight_error": error}
        return layers
