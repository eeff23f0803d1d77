"""Structured pruning of MLP intermediate channels and attention heads, shrinking the layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ppq_lightning.calibration import calibrate_sequentially, check_calibrate_on
from ppq_lightning.calibration_data import calibration_batches, check_num_batches
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.distributed import all_reduce_mean
from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.layers import weight_matrix
from ppq_lightning.ops.channels import channel_importance, keep_most_important
from ppq_lightning.ops.masks import check_sparsity
from ppq_lightning.ops.wanda import accumulate_act_norms
from ppq_lightning.sharing import SharedBasisLinear
from ppq_lightning.state import record_stage
from ppq_lightning.structure import select_columns, select_rows

# (input projections, output projection), by attribute name on the same parent module
MLP_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("c_fc",), "c_proj"))
HEAD_LAYOUT = (("q_proj",), ("k_proj", "v_proj"), "o_proj")
STRUCTURES = ("mlp", "heads", "both")


def _layout(parent: nn.Module, out_name: str) -> tuple[str, ...] | None:
    for inputs, output in MLP_LAYOUTS:
        if out_name == output and all(hasattr(parent, n) for n in inputs):
            return inputs
    return None


class ChannelPruning(CompressionCallback):
    """Remove a ``ratio`` of the MLP intermediate channels and/or attention heads of every block,
    really shrinking the weights (the measured compression rate counts removed weights as 0
    bits).

    Importance of an intermediate channel ``j``: ``E[x_j^2] * ||W_out[:, j]||^2``, from the
    inputs of the output projection (``down_proj``/``fc2``/``c_proj``, or ``o_proj`` for heads)
    on calibration data, block by block. Heads are removed by key/value group (one KV head and
    its query heads) so grouped-query attention stays consistent. MLPs of Llama, Mistral,
    Qwen2, OPT and GPT-2 are recognised; heads of attention modules with
    ``q_proj/k_proj/v_proj/o_proj`` and ``head_dim`` (Llama, Mistral, Qwen2). Fires once, before
    the first evaluation or at fit start. Masks of earlier pruning are sliced with the weights;
    a per-channel quantization grid stays valid.

    Args:
        ratio: fraction of channels (or KV groups of heads) removed per block, in [0, 1).
        structure: ``"mlp"``, ``"heads"`` or ``"both"``.
        num_calibration_batches: calibration batches for the importance statistics.
        calibrate_on: ``"compressed"`` or ``"original"`` (see ``CalibratedCompression``).
        device: where each block runs during calibration; None keeps the placement.
        **kwargs: ``targets`` (regexes restricting the output projections considered),
            ``ignore``, ``name``, ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: bad ratio/structure, or at run time a model with none of the known
            layouts, a layer of the pruned structure factorised by ``BasisSharing``, or a layer
            quantized with groups whose columns would be removed.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.ChannelPruning
              init_args: {ratio: 0.25, structure: mlp}
    """

    label = "channels"
    kind = "P"

    def __init__(
        self,
        ratio: float,
        structure: str = "mlp",
        num_calibration_batches: int = 32,
        calibrate_on: str = "compressed",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_sparsity(ratio, "ratio")
        if structure not in STRUCTURES:
            raise bad_value("structure", structure, f"one of {', '.join(STRUCTURES)}")
        super().__init__(**kwargs)
        self.ratio, self.structure = float(ratio), structure
        self.num_calibration_batches = check_num_batches(num_calibration_batches)
        self.calibrate_on, self.device = check_calibrate_on(calibrate_on), device

    def stage_config(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "structure": self.structure, "calibrate_on": self.calibrate_on}

    def _pruned_names(self) -> set[str]:
        """Attribute names of the layers this structure shrinks (inputs and outputs)."""
        names: set[str] = set()
        if self.structure in ("mlp", "both"):
            for inputs, output in MLP_LAYOUTS:
                names.update((*inputs, output))
        if self.structure in ("heads", "both"):
            names.update((*HEAD_LAYOUT[0], *HEAD_LAYOUT[1], HEAD_LAYOUT[2]))
        return names

    def _outputs(self, model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The output projections whose input channels are pruned."""
        shrunk = self._pruned_names()
        shared = sorted(
            name
            for name, module in model.named_modules()
            if isinstance(module, SharedBasisLinear) and name.rpartition(".")[2] in shrunk
        )
        if shared:
            raise PPQConfigError(
                f"ChannelPruning(structure={self.structure!r}) cannot shrink {shared[:4]}"
                f"{' ...' if len(shared) > 4 else ''}: BasisSharing factorised them, and a basis "
                "shared across blocks has one set of input channels for all its blocks (nor can "
                "sharing come after: it factorises dense weights only). Share and prune different "
                "projections: e.g. BasisSharing(projections=['q_proj', 'k_proj', 'v_proj']) with "
                "ChannelPruning(structure='mlp')."
            )
        chosen = {}
        for name, module in modules.items():
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            mlp = self.structure in ("mlp", "both") and _layout(parent, attribute) is not None
            heads = (
                self.structure in ("heads", "both")
                and attribute == HEAD_LAYOUT[2]
                and all(hasattr(parent, n) for n in (*HEAD_LAYOUT[0], *HEAD_LAYOUT[1]))
                and hasattr(parent, "head_dim")
            )
            if mlp or heads:
                chosen[name] = module
        if not chosen:
            raise PPQConfigError(
                f"ChannelPruning(structure={self.structure!r}) found no known MLP (gate/up/down, "
                "fc1/fc2, c_fc/c_proj) or attention (q/k/v/o_proj) layout among the targets."
            )
        return chosen

    def _prune(self, model: nn.Module, name: str, out: nn.Module, act: Tensor) -> dict[str, float]:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        scores = channel_importance(act, weight_matrix(out))  # (in,)
        if attribute == HEAD_LAYOUT[2] and _layout(parent, attribute) is None:
            head_dim = parent.head_dim
            per_group = getattr(parent, "num_key_value_groups", 1) * head_dim
            kept = keep_most_important(scores, self.ratio, group=per_group)
            groups = kept.reshape(-1, per_group)[:, 0] // per_group  # kept KV groups
            kv_kept = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            edits = [(n, "rows", kept) for n in HEAD_LAYOUT[0]]
            edits += [(n, "rows", kv_kept) for n in HEAD_LAYOUT[1]]
        else:
            kept = keep_most_important(scores, self.ratio)
            edits = [(n, "rows", kept) for n in _layout(parent, attribute)]
        edits.append((attribute, "cols", kept))
        entry = self.history_entry()
        for attr, axis, index in edits:
            layer = getattr(parent, attr)
            before = layer.weight.numel()
            (select_rows if axis == "rows" else select_columns)(layer, index)
            record_stage(
                layer,
                {
                    **entry,
                    f"kept_{axis}": index.tolist(),
                    "removed_weights": before - layer.weight.numel(),
                },
            )
        return {"kept_channels": float(kept.numel()), "channels": float(scores.numel())}

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        outputs = self._outputs(model, modules)
        stats: dict[str, tuple[Tensor | None, int]] = {}
        metrics: dict[str, dict[str, float]] = {}

        def observe(name: str, layer: nn.Module, x: Tensor) -> None:
            acc, seen = stats.get(name, (None, 0))
            stats[name] = accumulate_act_norms(acc, x.flatten(0, -2), seen)

        def solve(layers: dict[str, nn.Module]) -> None:
            for name, layer in layers.items():
                act, _ = all_reduce_mean(*stats.pop(name))  # data-parallel: all ranks
                metrics[name] = self._prune(model, name, layer, act)

        batches = calibration_batches(self.trainer, self.num_calibration_batches, self.dataloader)
        calibrate_sequentially(
            model,
            outputs,
            batches,
            observe,
            solve,
            self.calibrate_on,
            self.device,
            desc=self.display_label,
        )
        return metrics
