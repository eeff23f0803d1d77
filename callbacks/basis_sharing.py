"""Basis sharing (Wang et al., 2024): one low-rank basis for a projection across blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ppq_lightning.calibration.data import check_num_batches
from ppq_lightning.calibration.engine import calibrate_sequentially
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.calibrated import check_device, check_device_available
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.edits.sharing import SharingGroup, plan_sharing, share_group
from ppq_lightning.errors import (
    PPQConfigError,
    bad_value,
    check_bool,
    check_choice,
    check_count_or_ratio,
    check_int,
)
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.targets import compile_patterns
from ppq_lightning.ops.basis_sharing import SPLITS
from ppq_lightning.ops.hessian import HessianError, check_solver_args, whitening_factor

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True, kw_only=True)
class BasisSharingConfig(StageConfig):
    """Basis sharing's arguments (see :class:`BasisSharing`); ``projections`` is stored as a
    list, the Llama projections when not given.

    Raises:
        PPQConfigError: see :class:`BasisSharing`.
    """

    group_size: int
    rank: int | None = None
    ratio: float | None = None
    projections: list[str] | None = None
    whiten: bool = False
    split: str = "balanced"
    num_calibration_batches: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("whiten", self.whiten)
        check_choice("split", self.split, SPLITS)
        check_num_batches(self.num_calibration_batches)
        check_solver_args(1, self.damp)
        check_int("group_size", self.group_size, minimum=2)
        check_count_or_ratio("rank", self.rank, self.ratio)
        projections = self.projections
        projections = list(LLAMA_PROJECTIONS) if projections is None else projections
        projections = [projections] if isinstance(projections, str) else projections
        if not isinstance(projections, (list, tuple)) or not projections:
            raise bad_value("projections", projections, "a regex or a non-empty list of regexes")
        compile_patterns(projections, "projections")
        object.__setattr__(self, "projections", list(projections))


class BasisSharing(CompressionCallback):
    """Share one low-rank basis among the same projection of ``group_size`` consecutive blocks.

    For each projection (e.g. ``self_attn.q_proj``) the weights ``W_1..W_g`` of a group of
    ``g`` consecutive blocks are stacked along the output dimension and factorised by a
    truncated SVD, ``[W_1; ..; W_g] ~= U_k S_k V_k^T``: the basis ``B = S_k^1/2 V_k^T``
    (``k x in``) is shared, layer ``i`` keeps its rows of ``U_k S_k^1/2`` as coefficients
    ``C_i`` (``out x k``; ``split`` can put all of ``S_k`` there instead), and
    ``W_i ~= C_i B`` (``ppq_lightning.ops.basis_sharing``). Each layer is replaced by a
    :class:`~ppq_lightning.edits.sharing.SharedBasisLinear` holding the shared basis (the same
    ``nn.Linear(in, k, bias=False)`` object in every layer of the group) and its own
    ``nn.Linear(k, out)`` coefficients (with the original bias), so later stages prune and
    quantize the factors like any ``nn.Linear``. A group stores ``k * (in + g*out)`` weights
    instead of ``g*out*in``; the compression rate counts the factors against the original
    weights they replace (a shared basis once). By default a plain SVD of the weights (no
    calibration data); with ``whiten=True`` the paper's whitening: the stack is factorised as
    ``W S`` with ``S S^T`` the Hessian of the group's calibration inputs, so the error is
    minimised on the layer outputs (statistics from the dense model, block by block through the
    calibration engine; a group is factorised once its last block has been seen).

    Fires once, before the first evaluation or at fit start. The layers of a projection are
    grouped in block order; when their number is not a multiple of ``group_size``, the last
    group has fewer members and shares a basis among them (a single leftover layer gets a
    plain truncated SVD). Blocks are the model's repeated blocks
    (``ppq_lightning.calibration.blocks.find_blocks``). Basis sharing factorises dense weights: it
    comes before pruning and quantization (``S>P>Q``). In ``fit`` the factors are new
    parameters, so the optimizers are rebuilt after the stage (optimizer state starts afresh;
    single-process strategies only: a model already wrapped by DDP/FSDP is not re-wrapped).

    Args:
        group_size: blocks sharing one basis, an integer >= 2.
        rank: the rank ``k`` of every basis; or
        ratio: the fraction of each group's weights kept, in (0, 1):
            ``k = floor(ratio * g*out*in / (in + g*out))``.
        projections: regex or list of regexes naming the projections inside a block; each must
            match the end of a layer's name within the block at a ``.`` boundary (``"q_proj"``
            matches ``self_attn.q_proj``; ``"mlp\\..*_proj"`` every MLP projection). Every
            distinct layer name matched is shared separately. Default: the seven Llama-style
            projections ``q/k/v/o_proj``, ``gate/up/down_proj``.
        whiten: factorise the activation-whitened weights (needs calibration data).
        split: ``"balanced"`` (``C = U_k S_k^1/2``, ``B = S_k^1/2 V_k^T``: factors that survive
            later pruning/quantization far better) or ``"coefficients"`` (``C = U_k S_k``).
        num_calibration_batches: calibration batches for ``whiten`` (as for ``GPTQ``).
        damp: with ``whiten``, damping of the Hessian before its Cholesky factorisation, as a
            fraction of its mean diagonal (raised x10 while the factorisation fails).
        device: with ``whiten``, where each block runs during calibration (None: in place).
        **kwargs: ``targets``, ``ignore`` (restrict the candidate layers by full name; the
            selected layers of a projection are grouped in block order), ``name``, ``b_orig``,
            ``log_layers`` of :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: ``group_size`` not an integer >= 2; neither or both of ``rank``/
            ``ratio``; ``rank`` not an integer >= 1; ``ratio`` not in (0, 1); ``projections``
            empty or not regexes; ``whiten`` not a bool; a bad ``num_calibration_batches``,
            ``damp`` or ``device`` (not a torch device). At run time (before any layer is
            replaced): with ``whiten``, a ``device`` this machine lacks; no repeated blocks;
            ``group_size`` larger than the number of blocks; a projection regex that matches no
            layer; a matched layer that is already factorised or already carries a compression
            state; layers of one group with different shapes or bias; a rank above
            ``min(in, g*out)`` of a group, or a ``ratio`` that gives rank 0; with ``whiten``,
            missing or empty calibration data, or a grouped layer that never runs.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.BasisSharing
              init_args: {group_size: 2, ratio: 0.6, projections: [q_proj, k_proj, v_proj],
                          whiten: true, num_calibration_batches: 32}
            - class_path: ppq_lightning.callbacks.RTNQuantization
              init_args: {bits: 4}
    """

    default_name = "sharing"
    config_class = BasisSharingConfig
    edits_structure = True
    kind = StageKind.SHARE

    def __init__(
        self,
        group_size: int,
        rank: int | None = None,
        ratio: float | None = None,
        projections: list[str] | None = None,
        whiten: bool = False,
        split: str = "balanced",
        num_calibration_batches: int = 128,
        damp: float = 0.01,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            group_size=group_size,
            rank=rank,
            ratio=ratio,
            projections=projections,
            whiten=whiten,
            split=split,
            num_calibration_batches=num_calibration_batches,
            damp=damp,
            **kwargs,
        )
        self.device = check_device(device)
        self.calibration_report = None

    # -- the stage ---------------------------------------------------------------------------
    def calls_model(self) -> bool:
        """Only a whitened sharing runs the model on calibration batches."""
        return self.whiten

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        if self.whiten:
            check_device_available(self.device)
        groups = plan_sharing(
            model, modules, self.projections, self.group_size, self.rank, self.ratio
        )
        entry = self.history_entry()
        metrics: dict[str, dict[str, float]] = {}

        def share(group: SharingGroup, whitening: Tensor | None = None) -> None:
            key = f"{self.name}:{group.names[0]}"  # a layer is factorised once
            metrics.update(share_group(model, group, key, entry, whitening, self.split))

        if not self.whiten:
            for group in groups:
                share(group)
            return metrics
        # whitened: the Hessians of a group's layers, from the dense model block by block; the
        # group is factorised (and its layers replaced) once its last block has been seen
        targets = {n: m for g in groups for n, m in zip(g.names, g.layers, strict=True)}
        statistics = LayerStatistics("hessian")
        pending = list(groups)

        def solve(layers: dict[str, nn.Module]) -> None:
            statistics.end_block()
            ready = [g for g in pending if all(statistics.has(n) for n in g.names)]
            taken = statistics.take([n for g in ready for n in g.names])  # shared ones once
            for group in ready:
                hessian = sum(taken[n] for n in group.names)
                try:
                    factor = whitening_factor(hessian, self.damp)
                except HessianError as error:
                    raise HessianError(
                        f"stage {self.name!r} ({type(self).__name__}), layers "
                        f"{', '.join(group.names)}: {error}"
                    ) from error
                share(group, factor)
                pending.remove(group)

        batches = self.calibration_batches(self.num_calibration_batches)
        self.calibration_report = calibrate_sequentially(
            model,
            targets,
            batches,
            statistics.observe,
            solve,
            "original",
            self.device,
            self.forward_fn,
            desc=self.name,
        )
        if pending:
            names = [n for g in pending for n in g.names if n not in metrics]
            raise PPQConfigError(
                f"the layers {names} never ran during calibration: whitening needs their inputs."
            )
        return metrics
