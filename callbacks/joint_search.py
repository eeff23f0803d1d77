"""Structured pruning and mixed precision chosen together, under one budget of measured C."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.block_checkpoints import block_progress, check_block_checkpoints
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.errors import PPQConfigError, bad_value, check_choice, check_int, check_number
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.mixed_precision import check_width
from ppq_lightning.order.interference import reference_score
from ppq_lightning.order.joint_search import (
    CHANNELS,
    apply_levels,
    level_grid,
    search_levels,
    search_space,
)


@dataclass(frozen=True, kw_only=True)
class JointSearchConfig(StageConfig):
    """The joint search's arguments (see :class:`JointStructuralMixedPrecision`); ``bits`` and
    ``keep`` are stored with their defaults filled in.

    Raises:
        PPQConfigError: see :class:`JointStructuralMixedPrecision`.
    """

    budget: float
    b_orig: int = 16  # the budget is a measured C, whose unit is B_orig bits per weight
    bits: list[int | str] | None = None
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
        bits = [check_width(b, "bits", allow_off=False) for b in bits]
        specs = [level_grid(b) for b in bits]
        weight_bits = [spec.storage(4096, 4096).total_bits for spec in specs]
        if len(set(bits)) != len(bits) or weight_bits != sorted(weight_bits, reverse=True):
            raise bad_value(
                "bits",
                bits,
                "distinct bit widths or formats, largest first (by storage: mildest first)",
            )
        if not isinstance(keep, list) or not keep or keep[0] != 1.0:
            raise bad_value("keep", keep, "a list of kept shares starting at 1.0")
        for k in keep:
            check_number("keep", k, 0, 1, low_open=True)
        if keep != sorted(set(keep), reverse=True):
            raise bad_value("keep", keep, "distinct shares, largest first")
        object.__setattr__(self, "bits", list(bits))
        object.__setattr__(self, "keep", [float(k) for k in keep])
        if len(keep) > 1 and any(isinstance(b, str) for b in bits):
            raise bad_value(
                "keep",
                keep,
                "[1.0] with formats among bits (removed channels would leave "
                "rows whose length the format's groups do not divide)",
            )
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
        block_checkpoints: save the search's state after every move so a killed run
            continues from its last move (``True``: under the Trainer's ``default_root_dir``;
            a folder; ``False``: see docs/scale.md, "Resuming a calibration"). Not part of the
            identity.
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
        bits: list[int | str] | None = None,
        keep: list[float] | None = None,
        num_calibration_batches: int = 16,
        score_batches: int = 4,
        rescore_every: int = 16,
        channels: str = "auto",
        block_checkpoints: bool | str = True,
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
        self.search_log: list[dict[str, float]] = []  # the last search's moves
        self.block_checkpoints = check_block_checkpoints(block_checkpoints)
        self.resumed_moves = 0

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        """Search the levels (``order.joint_search``), then apply them for real."""
        start = time.perf_counter()
        batches = self.calibration_batches(self.num_calibration_batches)
        if not batches:
            raise PPQConfigError(f"{self.name}: no calibration batches to score the search on.")
        space = search_space(
            model, modules, batches, self.bits, self.keep, self.channels, self.forward_fn
        )
        space.check_reachable(self.budget, self.b_orig)
        score = reference_score(
            model, batches[: self.score_batches], "calibration_kl", self.forward_fn
        )
        progress = block_progress(self, self.block_checkpoints)
        if progress is not None:  # the dense model, the data and the stage
            progress.begin(model, [], batches)
        found = search_levels(
            model, modules, space, self.budget, self.b_orig, score, self.rescore_every, progress
        )
        layers = apply_levels(model, modules, space, found.levels, self.history_entry())
        if progress is not None:
            self.resumed_moves = len(progress.resumed)
            progress.finish()
        self.search_log, self.search_seconds = found.log, time.perf_counter() - start
        return layers
