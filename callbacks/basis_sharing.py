"""Basis sharing (Wang et al., 2024): one low-rank basis for a projection across blocks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration import calibrate_sequentially, find_blocks
from ppq_lightning.calibration_data import calibration_batches, check_num_batches
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.calibrated import LayerStatistics
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.layers import is_compressible, weight_matrix
from ppq_lightning.ops.basis_sharing import (
    SPLITS,
    factor_params,
    max_rank,
    rank_for_ratio,
    shared_basis,
)
from ppq_lightning.ops.hessian import accumulate_hessian, check_solver_args, whitening_factor
from ppq_lightning.sharing import SharedBasisLinear, replace_module, sharing_record
from ppq_lightning.state import get_state, record_stage
from ppq_lightning.targets import compile_patterns

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class _Group:
    """One sharing group: the same projection in consecutive blocks."""

    projection: str  # name inside the block, e.g. "self_attn.q_proj"
    names: list[str]  # full module names, in block order
    layers: list[nn.Module]
    rank: int


class BasisSharing(CompressionCallback):
    """Share one low-rank basis among the same projection of ``group_size`` consecutive blocks.

    For each projection (e.g. ``self_attn.q_proj``) the weights ``W_1..W_g`` of a group of
    ``g`` consecutive blocks are stacked along the output dimension and factorised by a
    truncated SVD, ``[W_1; ..; W_g] ~= U_k S_k V_k^T``: the basis ``B = S_k^1/2 V_k^T``
    (``k x in``) is shared, layer ``i`` keeps its rows of ``U_k S_k^1/2`` as coefficients
    ``C_i`` (``out x k``; ``split`` can put all of ``S_k`` there instead), and
    ``W_i ~= C_i B`` (``ppq_lightning.ops.basis_sharing``). Each layer is replaced by a
    :class:`~ppq_lightning.sharing.SharedBasisLinear` holding the shared basis (the same
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
    (``ppq_lightning.calibration.find_blocks``). Basis sharing factorises dense weights: it
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
            empty or not regexes; ``whiten`` not a bool; a bad ``num_calibration_batches`` or
            ``damp``. At run time (before any layer is replaced): no repeated blocks;
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

    label = "sharing"
    kind = "S"

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
        if not isinstance(whiten, bool):
            raise bad_value("whiten", whiten, "true or false")
        if split not in SPLITS:
            raise bad_value("split", split, f"one of {', '.join(SPLITS)}")
        check_num_batches(num_calibration_batches)
        check_solver_args(1, damp)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise bad_value("group_size", group_size, "an integer >= 2")
        if (rank is None) == (ratio is None):
            raise PPQConfigError(f"rank={rank!r}, ratio={ratio!r}: give exactly one.")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise bad_value("rank", rank, "an integer >= 1")
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1
        ):
            raise bad_value("ratio", ratio, "a number in (0, 1)")
        projections = list(LLAMA_PROJECTIONS) if projections is None else projections
        projections = [projections] if isinstance(projections, str) else projections
        if not isinstance(projections, (list, tuple)) or not projections:
            raise bad_value("projections", projections, "a regex or a non-empty list of regexes")
        compile_patterns(projections, "projections")
        super().__init__(**kwargs)
        self.group_size, self.rank, self.ratio = group_size, rank, ratio
        self.projections = list(projections)
        self._patterns = [re.compile(rf"(?:^|\.)(?:{p})$") for p in self.projections]
        self.whiten, self.split = whiten, split
        self.num_calibration_batches = num_calibration_batches
        self.damp, self.device = damp, device
        self.forward_fn: Callable[[nn.Module, Any], Any] | None = None
        self.calibration_report = None

    def stage_config(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            "rank": self.rank,
            "ratio": self.ratio,
            "projections": self.projections,
            "whiten": self.whiten,
            "split": self.split,
        }

    # -- planning: every check before any layer is replaced --------------------------------
    def _projections(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, list[tuple[str, nn.Module]]]:
        """``{projection name in the block: [(full name, layer), ...] in block order}``."""
        found = find_blocks(model)
        if found is None:
            raise PPQConfigError(
                "BasisSharing needs a model with repeated blocks (an nn.ModuleList of identical "
                "blocks); none was found."
            )
        container_name, blocks = found
        if self.group_size > len(blocks):
            raise bad_value(
                "group_size",
                self.group_size,
                f"an integer from 2 to {len(blocks)} (the model has {len(blocks)} blocks in "
                f"{container_name})",
            )
        selected = {id(m) for m in modules.values()}
        matched = [False] * len(self._patterns)
        chosen: dict[str, list[tuple[str, nn.Module]]] = {}
        linear_names: list[str] = []
        prefix = f"{container_name}." if container_name else ""
        for index, block in enumerate(blocks):
            factorised = [n for n, m in block.named_modules() if isinstance(m, SharedBasisLinear)]
            for inner, layer in block.named_modules():
                hits = [i for i, p in enumerate(self._patterns) if p.search(inner)]
                full = f"{prefix}{index}.{inner}"
                inside = [n for n in factorised if inner == n or inner.startswith(n + ".")]
                if hits and inside:
                    raise PPQConfigError(
                        f"projections={self.projections!r} matches {full}, which is already "
                        f"factorised with a shared basis ({prefix}{index}.{inside[0]}); "
                        "a projection can be shared once."
                    )
                if not is_compressible(layer) or isinstance(layer, nn.Conv2d):
                    continue
                linear_names.append(inner)
                if not hits or id(layer) not in selected:
                    continue
                state = get_state(layer)
                if state is not None:
                    raise PPQConfigError(
                        f"{full} is already compressed by stages {state.stages}; BasisSharing "
                        "factorises dense weights: put it before pruning and quantization "
                        "(S>P>Q)."
                    )
                for i in hits:
                    matched[i] = True
                chosen.setdefault(inner, []).append((full, layer))
        missing = [p for p, hit in zip(self.projections, matched, strict=True) if not hit]
        if missing:
            sample = ", ".join(list(dict.fromkeys(linear_names))[:8]) or "none"
            raise PPQConfigError(
                f"projections {missing} matched no selected linear layer inside the blocks "
                f"(layer names in a block: {sample}). Please check `projections` "
                "(and `targets`/`ignore`)."
            )
        return chosen

    def _group_rank(self, names: list[str], out_features: int, in_features: int) -> int:
        g = len(names)
        top = max_rank(in_features, [out_features] * g)
        if self.rank is not None:
            if self.rank > top:
                raise bad_value(
                    "rank",
                    self.rank,
                    f"an integer from 1 to {top} = min(in, g*out) for the group {names} "
                    f"({g} x ({out_features}, {in_features}))",
                )
            return self.rank
        rank = rank_for_ratio(self.ratio, g, out_features, in_features)
        if rank < 1:
            raise bad_value(
                "ratio",
                self.ratio,
                f"a ratio giving rank >= 1 for the group {names} ({g} x ({out_features}, "
                f"{in_features})); it gives rank 0",
            )
        return rank

    def _plan(self, model: nn.Module, modules: dict[str, nn.Module]) -> list[_Group]:
        groups = []
        for projection, members in self._projections(model, modules).items():
            for start in range(0, len(members), self.group_size):
                chunk = members[start : start + self.group_size]
                names = [name for name, _ in chunk]
                layers = [layer for _, layer in chunk]
                shapes = [tuple(weight_matrix(m).shape) for m in layers]
                biases = [getattr(m, "bias", None) is not None for m in layers]
                if len(set(shapes)) > 1 or len(set(biases)) > 1:
                    raise PPQConfigError(
                        f"the layers {names} share a basis but differ: weight shapes {shapes}, "
                        f"bias {biases}; every layer of a group needs one shape and bias."
                    )
                out_features, in_features = shapes[0]
                rank = self._group_rank(names, out_features, in_features)
                groups.append(_Group(projection, names, layers, rank))
        return groups

    # -- the stage ---------------------------------------------------------------------------
    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        groups = self._plan(model, modules)
        entry = self.history_entry()
        metrics: dict[str, dict[str, float]] = {}
        if not self.whiten:
            for group in groups:
                metrics.update(self._share(model, group, entry))
            return metrics
        # whitened: the Hessians of a group's layers, from the dense model block by block; the
        # group is factorised (and its layers replaced) once its last block has been seen
        targets = {n: m for g in groups for n, m in zip(g.names, g.layers, strict=True)}
        statistics = LayerStatistics(accumulate_hessian, torch.float32)
        pending = list(groups)

        def solve(layers: dict[str, nn.Module]) -> None:
            statistics.end_block()
            ready = [g for g in pending if all(statistics.has(n) for n in g.names)]
            taken = statistics.take([n for g in ready for n in g.names])  # shared ones once
            for group in ready:
                hessian = sum(taken[n] for n in group.names)
                factor = whitening_factor(hessian, self.damp)
                metrics.update(self._share(model, group, entry, factor))
                pending.remove(group)

        batches = calibration_batches(self.trainer, self.num_calibration_batches, self.dataloader)
        self.calibration_report = calibrate_sequentially(
            model,
            targets,
            batches,
            statistics.observe,
            solve,
            "original",
            self.device,
            self.forward_fn,
            desc=self.display_label,
        )
        if pending:
            names = [n for g in pending for n in g.names if n not in metrics]
            raise PPQConfigError(
                f"the layers {names} never ran during calibration: whitening needs their inputs."
            )
        return metrics

    def _share(
        self,
        model: nn.Module,
        group: _Group,
        entry: dict[str, Any],
        whitening: Tensor | None = None,
    ) -> dict[str, dict[str, float]]:
        weights = [weight_matrix(m) for m in group.layers]  # g x (out, in)
        factors = shared_basis(weights, group.rank, whitening, self.split)
        like = weights[0]
        out_features, in_features = like.shape
        basis = nn.Linear(in_features, group.rank, bias=False, device=like.device, dtype=like.dtype)
        basis.weight.data.copy_(factors.basis)  # (k, in)
        basis.weight.requires_grad_(group.layers[0].weight.requires_grad)
        record_stage(basis, {**entry, "original_weights": 0})
        key = f"{self.display_label}:{group.names[0]}"  # a layer is factorised once
        metrics = {}
        for name, layer, c, error in zip(
            group.names, group.layers, factors.coefficients, factors.relative_errors, strict=True
        ):
            bias = getattr(layer, "bias", None)
            coefficients = nn.Linear(
                group.rank,
                out_features,
                bias=bias is not None,
                device=like.device,
                dtype=like.dtype,
            )
            coefficients.weight.data.copy_(c)  # (out, k)
            coefficients.weight.requires_grad_(layer.weight.requires_grad)
            if bias is not None:
                coefficients.bias.data.copy_(bias.data)
                coefficients.bias.requires_grad_(bias.requires_grad)
            record_stage(coefficients, {**entry, "original_weights": out_features * in_features})
            shared = SharedBasisLinear(basis, coefficients, key).train(layer.training)
            record_stage(shared, {**entry, "shared_basis": sharing_record(shared)})
            replace_module(model, name, shared)
            metrics[name] = {
                "rank": float(group.rank),
                "relative_error": error,
                "params": float(group.rank * out_features),
                "basis_params": float(group.rank * in_features),
                "group_params": float(
                    factor_params(group.rank, in_features, [out_features] * len(group.names))
                ),
                "original_params": float(out_features * in_features),
                "group_size": float(len(group.names)),
            }
        return metrics
