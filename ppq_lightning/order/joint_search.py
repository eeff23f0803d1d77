"""The joint structural + mixed-precision search: its units, storage estimate, greedy loop and
the edits that apply its choice. No Lightning: ``callbacks.JointStructuralMixedPrecision`` is
its adapter (validate, search, apply, log).

A *unit* is either a target layer's bit width (levels index ``bits``) or a channel unit
(``edits.channel_units``: an MLP's hidden channels or a CNN's coupled channel group; levels
index ``keep``). The search starts with every unit at level 0 and moves one unit one level at
a time, the move that adds the least measured loss per bit of storage saved
(``ops.allocation.best_move``), until the estimated measured C reaches the budget. A move's
loss is measured on the model with the move emulated in place: removed channels' reader
columns zeroed, each target fake-quantized on the grid of its kept columns (the same function
as the edited model); it is undone after scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from ppq_lightning.calibration.capture import evaluating, example_call
from ppq_lightning.calibration.data import default_forward
from ppq_lightning.calibration.engine import observing
from ppq_lightning.calibration.progress import BlockProgress
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.compressed.history import HistoryEntry
from ppq_lightning.compressed.state import record_grid, record_stage
from ppq_lightning.edits.channel_units import ChannelUnit, depgraph_units, mlp_units
from ppq_lightning.edits.channels import apply_channel_edits, mlp_inputs, plan_channel_edits
from ppq_lightning.edits.depgraph import attention_heads, output_layers, prune_chosen_channels
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.modules.tree import parent_of
from ppq_lightning.modules.views import set_weight_matrix, weight_matrix
from ppq_lightning.ops.allocation import best_move
from ppq_lightning.ops.channels import channel_importance
from ppq_lightning.ops.grid_formats import INT, GridSpec
from ppq_lightning.ops.reconstruction import relative_weight_error

CHANNELS = ("auto", "mlp", "depgraph")
ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class SearchSpace:
    """What the search chooses among: each target's bit width and each channel unit's share.

    Attributes:
        shapes: ``(rows, columns)`` of each target layer's matrix.
        units: the channel units (empty for bits only).
        bits: the bit widths, mildest first.
        keep: the kept shares of a channel unit, 1.0 first.
        traced: for coupled CNN groups, Torch-Pruning's graph and the input it was traced on.
    """

    shapes: dict[str, tuple[int, int]]
    units: list[ChannelUnit]
    bits: list[int | str]
    keep: list[float]
    traced: tuple[Any, Tensor] | None = None

    def first_levels(self) -> dict[str, int]:
        return {n: 0 for n in self.shapes} | {u.name: 0 for u in self.units}

    def last_levels(self) -> dict[str, int]:
        return {n: len(self.bits) - 1 for n in self.shapes} | {
            u.name: len(self.keep) - 1 for u in self.units
        }

    def removed_counts(self, levels: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Matrix rows and columns each layer loses at ``levels``."""
        counts: dict[str, tuple[int, int]] = {}
        for unit in self.units:
            for layer, (rows, cols) in unit.layers[levels[unit.name]].items():
                r, c = counts.get(layer, (0, 0))
                counts[layer] = (r + rows.numel(), c + cols.numel())
        return counts

    def storage_bits(self, levels: dict[str, int]) -> float:
        """Estimated bits of the target layers at ``levels``: values plus, per row, an fp16
        scale and a ``b``-bit zero (an integer level), or what a format stores
        (``GridSpec.storage``); removed channels at 0 bits."""
        removed, total = self.removed_counts(levels), 0.0
        for name, (rows, cols) in self.shapes.items():
            spec = level_grid(self.bits[levels[name]])
            lost_rows, lost_cols = removed.get(name, (0, 0))
            rows, cols = rows - lost_rows, cols - lost_cols
            total += spec.storage(rows, cols).total_bits
        return total

    def original_bits(self, b_orig: int) -> float:
        return sum(r * c for r, c in self.shapes.values()) * b_orig

    def check_reachable(self, budget: float, b_orig: int) -> None:
        """Refuse a ``budget`` that even the strongest levels miss.

        Raises:
            PPQConfigError: naming ``budget`` and the largest C these levels reach.
        """
        strongest = self.original_bits(b_orig) / self.storage_bits(self.last_levels())
        if strongest < budget:
            raise bad_value(
                "budget",
                budget,
                f"a measured C these levels can reach (at most about {strongest:.2f} with "
                f"bits={self.bits[-1]} everywhere and keep={self.keep[-1]})",
            )

    def kept_shares(self, levels: dict[str, int]) -> dict[str, float]:
        """The kept share of each target layer's weights at ``levels``."""
        removed = self.removed_counts(levels)
        shares = {}
        for name, (rows, cols) in self.shapes.items():
            lost_rows, lost_cols = removed.get(name, (0, 0))
            shares[name] = (rows - lost_rows) * (cols - lost_cols) / (rows * cols)
        return shares


@dataclass
class SearchResult:
    """The chosen levels, and one record per move (``move``, ``kl``, ``C``)."""

    levels: dict[str, int]
    log: list[dict[str, float]] = field(default_factory=list)


def mlp_outputs(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
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


def mlp_channel_scores(
    model: nn.Module,
    modules: dict[str, nn.Module],
    downs: list[str],
    batches: list[Any],
    forward: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """``E[x_j^2] ||W_out[:, j]||^2`` of every MLP output projection, on the dense model
    (``E[x_j^2]`` is the engine's ``act_norm`` statistic, as Wanda's)."""
    statistics = LayerStatistics("act_norm")
    projections = {d: modules[d] for d in downs}
    forward = forward or default_forward
    with torch.no_grad(), evaluating(model), observing(projections, statistics.observe):
        for batch in batches:
            forward(model, batch)
    means = statistics.take(downs)
    return {d: channel_importance(means[d], weight_matrix(modules[d]).float()) for d in downs}


def level_grid(width: int | str) -> GridSpec:
    """The grid of one level of the search: bits on a per-channel asymmetric integer grid, or
    a format (``"nvfp4"``, ``"fp8"``, ``"Q4_K"``, ...)."""
    return GridSpec.of(width) if isinstance(width, str) else GridSpec.of(INT, width)


def search_space(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[Any],
    bits: list[int | str],
    keep: list[float],
    channels: str = "auto",
    forward: ForwardFn | None = None,
) -> SearchSpace:
    """The units of a search over ``modules``: a bit width per target and, unless ``keep`` is
    ``[1.0]``, channel units: MLP hidden channels (``channels="mlp"``), coupled CNN groups
    (``"depgraph"``, whose producers are all targets), or the MLPs when the model has any
    (``"auto"``).

    Raises:
        PPQConfigError: ``keep`` below 1 without a channel unit of the kind asked for.
    """
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in modules.items()}
    if len(keep) == 1:
        return SearchSpace(shapes, [], bits, keep)
    downs = mlp_outputs(model, modules)
    if channels == "auto":
        has_mlps = bool(downs or mlp_outputs(model, dict(model.named_modules())))
        channels = "mlp" if has_mlps else "depgraph"
    if channels == "mlp":
        if not downs:
            raise PPQConfigError(
                "JointStructuralMixedPrecision: keep below 1.0 needs MLPs (gate/up/down, "
                "fc1/fc2, c_fc/c_proj) among the targets; give keep=[1.0] for bits only, "
                "or channels='depgraph' for a CNN."
            )
        scores = mlp_channel_scores(model, modules, downs, batches, forward)
        return SearchSpace(shapes, mlp_units(model, downs, scores, keep), bits, keep)
    device = next(model.parameters()).device  # traced with the call the stage's forward makes
    example = move_data_to_device(example_call(model, batches[0], forward), device)
    protected = set(getattr(model, "default_ignore", None) or ())
    ignored = [m for n, m in model.named_modules() if n in protected]
    with evaluating(model):  # the model's output layers keep their output channels
        ignored += output_layers(model, example)
        units, graph = depgraph_units(model, example, ignored, keep, set(attention_heads(model)))
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
    return SearchSpace(shapes, units, bits, keep, (graph, example))


def search_levels(
    model: nn.Module,
    modules: dict[str, nn.Module],
    space: SearchSpace,
    budget: float,
    b_orig: int,
    score: Callable[[nn.Module], float],
    rescore_every: int = 16,
    progress: BlockProgress | None = None,
) -> SearchResult:
    """Greedy levels that reach ``budget`` (estimated measured C) at the least measured loss
    ``score(model)``; the model's weights are as they were when it returns.

    Args:
        progress: the search's state on disk (``calibration.progress``; begun on the model,
            data and stage), or None: the state after the last move a killed run of this
            search saved (levels, moves, loss, the deltas scored) is taken up, and the state is
            saved after every move.

    Raises:
        PPQConfigError: a budget the strongest levels miss (naming the largest reachable C).
        CorruptStateError: saved state that cannot be read or does not fit the search space.
    """
    space.check_reachable(budget, b_orig)
    levels, last = space.first_levels(), space.last_levels()
    original = space.original_bits(b_orig)
    # every layer a search writes: the targets and the consumers of channel units
    layers = dict(modules) | {
        n: model.get_submodule(n)
        for u in space.units
        for removal in u.layers
        for n, (_, cols) in removal.items()
        if cols.numel()
    }
    weights = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
    readers = {  # the units that remove columns of each layer
        n: [u for u in space.units if any(n in r and r[n][1].numel() for r in u.layers)]
        for n in layers
    }
    writes = {u.name: [n for n in layers if u in readers[n]] for u in space.units}

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
            grid = level_grid(space.bits[levels[name]]).compute(columns.float())
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
        before = space.storage_bits(levels)
        levels[unit] += 1
        after = space.storage_bits(levels)
        levels[unit] -= 1
        return before - after

    result = SearchResult(levels)
    try:
        saved = progress.load_steps() if progress is not None else []
        if saved:
            current, deltas = _take_up(saved[-1], levels, last, result, progress)
        for name in layers:
            emulate(name)
        if not saved:
            current = score(model)
            deltas: dict[str, float] = {}
        while original / space.storage_bits(levels) < budget:
            if len(result.log) % rescore_every == 0:
                deltas = {u: loss_after(u) - current for u in levels if levels[u] < last[u]}
            unit = best_move(levels, last, deltas, saved_bits)
            if unit is None:  # cannot happen below the strongest levels; kept as a guard
                raise PPQConfigError(f"no move of the joint search reaches budget={budget}.")
            move(unit, 1)
            current = score(model)
            if levels[unit] < last[unit]:
                deltas[unit] = loss_after(unit) - current
            else:
                deltas.pop(unit, None)
            moved = len(result.log) + 1
            C = original / space.storage_bits(levels)
            result.log.append({"move": moved, "kl": current, "C": C})
            if progress is not None:
                state = {"levels": levels, "log": result.log, "deltas": deltas}
                progress.save_steps([{**state, "current": current}])
    finally:
        for name, module in layers.items():  # back to the dense weights
            set_weight_matrix(module, weights[name])
    return result


def _take_up(
    state: dict[str, Any],
    levels: dict[str, int],
    last: dict[str, int],
    result: SearchResult,
    progress: BlockProgress,
) -> tuple[float, dict[str, float]]:
    """Put a saved search ``state`` into ``levels`` and ``result``; return its loss and deltas.

    Raises:
        CorruptStateError: when the state does not fit the search space.
    """
    saved = state.get("levels")
    fits = isinstance(saved, dict) and saved.keys() == levels.keys()
    fits = fits and all(type(v) is int and 0 <= v <= last[k] for k, v in saved.items())
    deltas = state.get("deltas")
    if not fits or not isinstance(deltas, dict) or not isinstance(state.get("log"), list):
        raise progress.corrupt_steps("its levels do not fit this search space")
    levels.update(saved)
    result.log[:] = state["log"]
    progress.resumed = list(range(len(result.log)))  # the moves taken up
    return float(state["current"]), {k: float(v) for k, v in deltas.items()}


def apply_levels(
    model: nn.Module,
    modules: dict[str, nn.Module],
    space: SearchSpace,
    levels: dict[str, int],
    entry: HistoryEntry,
) -> dict[str, dict[str, float]]:
    """Edit ``model`` as ``levels`` say: remove the chosen channels (recorded edits that a
    checkpoint replays), round each target to its bits on a per-channel asymmetric grid
    (recorded), and record the stage with each layer's ``layer_bits`` and ``layer_keep``.
    Returns per-layer metrics ``bits``, ``keep``, ``weight_error``."""
    kept_share = space.kept_shares(levels)
    chosen = [u for u in space.units if levels[u.name] > 0]
    if space.traced is not None:
        graph, example = space.traced
        removed = [(*u.root, u.removed[levels[u.name]].tolist()) for u in chosen]
        prune_chosen_channels(model, example, graph, removed, entry)
    for unit in chosen:  # MLP units
        if unit.root is None:
            down = unit.name.removeprefix("keep:")
            parent, attribute = parent_of(model, down)
            share = space.keep[levels[unit.name]]
            edits = plan_channel_edits(parent, attribute, unit.scores, 1 - share)
            apply_channel_edits(parent, edits, entry)
    layers = {}
    for name, module in modules.items():
        bits = space.bits[levels[name]]
        w = weight_matrix(module)
        grid = level_grid(bits).compute(w.float())
        q = grid.fake_quantize(w.float()).to(w.dtype)
        error = relative_weight_error(w, q)
        set_weight_matrix(module, q)
        record_grid(module, grid)
        share = kept_share[name]
        record_stage(module, {**entry, "layer_bits": bits, "layer_keep": share})
        layers[name] = {"bits": float(grid.bits), "keep": share, "weight_error": error}
    return layers
