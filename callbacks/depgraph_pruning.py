"""Structured channel (and attention-head) pruning of CNNs and ViTs through Torch-Pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import move_data_to_device
from torch import nn

from ppq_lightning.calibration.capture import evaluating, example_call
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.stage import CompressionStage
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.edits.depgraph import output_layers, prune_channels
from ppq_lightning.errors import PPQConfigError, check_bool, check_int
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.targets import compile_patterns
from ppq_lightning.ops.masks import check_sparsity


@dataclass(frozen=True, kw_only=True)
class DepGraphConfig(StageConfig):
    """DepGraph pruning's arguments (see :class:`DepGraphPruning`).

    Raises:
        PPQConfigError: a ratio outside [0, 1), ``prune_heads`` not a bool, ``round_to`` < 1.
    """

    ratio: float
    prune_heads: bool = False
    round_to: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.ratio, "ratio")
        check_bool("prune_heads", self.prune_heads)
        check_int("round_to", self.round_to, minimum=1, allow_none=True)


def refuse_language_models(model: nn.Module) -> None:
    """Refuse a model holding a transformers language model (a module with output embeddings and
    a ``config.num_attention_heads``): Torch-Pruning's dependency-group search does not finish
    on one (a tiny two-layer Llama ran for minutes), so it is refused before anything changes.

    Raises:
        PPQConfigError: naming the module and the stages that prune a language model.
    """
    for name, module in model.named_modules():
        heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
        embeddings = getattr(module, "get_output_embeddings", None)
        if heads and callable(embeddings) and embeddings() is not None:
            raise PPQConfigError(
                f"DepGraphPruning cannot prune {name or 'the model'} ({type(module).__name__}), a "
                "transformers language model: Torch-Pruning's dependency search does not finish "
                "on one. Prune its structure with ChannelPruning (MLP channels and attention "
                "heads, from calibration statistics) or BlockRemoval (whole blocks, SLEB)."
            )


class DepGraphPruning(CompressionCallback):
    """Remove a ``ratio`` of the channels of every coupled group of a CNN or ViT, really
    shrinking its tensors (Torch-Pruning's dependency graph: a convolution's output channel
    goes with its BatchNorm channel and the input channels of every layer reading it, residual
    additions couple their branches), smallest group L2 norm first.

    With ``prune_heads`` a timm ViT's attention heads are removed whole. The edit is recorded
    on the model and replayed when a checkpoint loads into a fresh model; the removed weights
    count as 0 bits in the measured C. Masks and per-channel grids of earlier stages are
    sliced with the weights. Fires once, before the first evaluation or at fit start. The
    model's classifier (``default_ignore`` of ``ImageClassifierModule``) and the layers named by
    ``ignore`` keep their output channels.

    Args:
        ratio: fraction of each group's channels (or heads) removed, in [0, 1).
        prune_heads: prune whole attention heads of timm ViTs (``qkv`` + ``num_heads``).
        round_to: keep channel counts multiples of this (None: any).
        **kwargs: ``ignore`` (regexes of layers whose output channels stay), ``name``,
            ``b_orig``, ``log_layers``.

    Raises:
        PPQConfigError: bad ratio/round_to/prune_heads; at run time, no calibration batch (one
            example input is traced), or a layer quantized with input groups that would lose
            input channels (nothing is changed then).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.DepGraphPruning
              init_args: {name: C, ratio: 0.3}
    """

    runs_model = True  # traces the model on one calibration batch

    default_name = "depgraph"
    config_class = DepGraphConfig
    edits_structure = True
    kind = StageKind.PRUNE

    def __init__(
        self,
        ratio: float,
        prune_heads: bool = False,
        round_to: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(ratio=ratio, prune_heads=prune_heads, round_to=round_to, **kwargs)

    def check_ahead(self, model: nn.Module, earlier: list[CompressionStage]) -> None:
        refuse_language_models(model)
        super().check_ahead(model, earlier)

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        refuse_language_models(model)
        batch = self.calibration_batches(1)[0]
        device = next(model.parameters()).device
        # traced with the call the stage's forward makes (positional and keyword arguments)
        example = move_data_to_device(example_call(model, batch, self.forward_fn), device)
        protected = set(getattr(model, "default_ignore", None) or ())
        patterns = compile_patterns(self.ignore, "ignore")
        ignored = [
            m
            for n, m in model.named_modules()
            if n in protected or (patterns and any(p.search(n) for p in patterns))
        ]
        with evaluating(model):  # the model's output layers keep their output channels
            ignored += output_layers(model, example)
        result = prune_channels(
            model,
            example,
            self.ratio,
            ignored,
            self.history_entry(),
            self.prune_heads,
            self.round_to,
        )
        return {"model": result}
