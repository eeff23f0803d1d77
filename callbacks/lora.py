"""LoRA fine-tuning (peft) over a compressed, frozen base: the stage ``L`` of an order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from ppq_lightning.calibration.boundary import trace_default_boundary
from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.fit_record import FitRecorder
from ppq_lightning.callbacks.stage import StageResult
from ppq_lightning.compressed.history import StageKind
from ppq_lightning.compressed.state import current_grid, current_mask, record_stage
from ppq_lightning.edits.lora import (
    ADAPTER,
    adapter_update,
    keep_adapter,
    lora_layers,
    merge_adapter,
)
from ppq_lightning.errors import (
    PPQConfigError,
    bad_value,
    check_bool,
    check_choice,
    check_int,
    check_number,
)
from ppq_lightning.modules.attention import check_runs_modules
from ppq_lightning.modules.config import StageConfig
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import is_convolution, weight_matrix

MERGES = ("never", "at_end")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(StageConfig):
    """LoRA fine-tuning's arguments (see :class:`LoRAFineTune`; its ``target_modules`` is
    ``targets`` here).

    Raises:
        PPQConfigError: ``r`` < 1, ``alpha`` <= 0, ``dropout`` outside [0, 1), an unknown
            ``merge``, ``reproject`` not a bool.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    merge: str = "never"
    reproject: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        check_choice("merge", self.merge, MERGES)
        check_bool("reproject", self.reproject)


class LoRAFineTune(CompressionCallback):
    """Train LoRA adapters (peft) on a frozen, possibly pruned and quantized base in ``fit``.

    At ``setup`` of ``fit`` the target layers get peft LoRA adapters (``lora_B`` starts at zero,
    so the model is unchanged) and every other parameter is frozen: the compressed base stays
    bit for bit as it was, with its zeros and on its grid, while the adapters train. Stages
    listed before this one fire at fit start and compress the base (``...q_proj.base_layer``);
    stages listed after it fire when training ends.

    When training ends the adapters are either kept separate (``merge="never"``: the model
    computes ``W x + B A x * alpha / r``; the adapter weights count in the measured C) or
    merged (``merge="at_end"``): ``W + B A * alpha / r`` is re-projected onto the recorded mask
    (pruned entries stay 0) and grid (rounded), the adapters are removed, and the share of the
    adapter update that the projection lost is reported per layer (``projection_loss``,
    ``||W + dW - proj(W + dW)||^2 / ||dW||^2``). A later pruning stage on a model with
    unmerged adapters prunes the base only (with a warning: the adapters stay dense).

    An ``nn.MultiheadAttention``'s projections are adapted like linear layers: peft's
    ``lora.Linear`` wraps its ``q_proj``/``k_proj``/``v_proj`` views of ``in_proj_weight``
    and its ``out_proj`` (``modules.attention``), and the attention computes through them while
    they carry adapters, so the adapters train and count. (peft's own ``MultiheadAttention``
    layer merges the adapters into ``in_proj_weight`` before every forward and subtracts them
    after, which moves the frozen compressed base off its grid by rounding.)

    Args:
        r: adapter rank, an integer >= 1.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``), > 0.
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: regex or list of regexes of the layers to adapt (``re.search`` on the
            module name); None adapts every default target (all linear layers but embeddings and
            the head).
        merge: ``"never"`` or ``"at_end"``.
        reproject: allow merging into a pruned or quantized base by re-projecting onto its mask
            and grid. With ``False`` such a merge is refused at fit start (before training).
        **kwargs: ``ignore``, ``name``, ``b_orig``, ``log_layers`` of
            :class:`~ppq_lightning.callbacks.CompressionCallback`.

    Raises:
        PPQConfigError: ``r`` not an integer >= 1, ``alpha`` <= 0, ``dropout`` outside [0, 1),
            an unknown ``merge``, ``reproject`` not a bool, ``target_modules`` given with
            ``targets``; at run time,
            ``target_modules`` that match nothing, layers that already carry adapters, a merge
            into a compressed base with ``reproject=False``, or use outside ``fit``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: ppq_lightning.callbacks.RTNQuantization
              init_args: {name: Q, bits: 4}
            - class_path: ppq_lightning.callbacks.LoRAFineTune
              init_args: {name: L, r: 8, alpha: 16, target_modules: ["proj"], merge: never}
    """

    default_name = "lora"
    config_class = LoRAConfig
    kind = StageKind.LORA
    trains = True
    completion = "lora"  # a checkpoint written mid-fit loads with the adapters kept

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] | None = None,
        merge: str = "never",
        reproject: bool = True,
        **kwargs: Any,
    ) -> None:
        if target_modules is not None and kwargs.get("targets") is not None:
            raise PPQConfigError(
                f"target_modules={target_modules!r} and targets={kwargs['targets']!r} are not "
                "allowed together: give target_modules only."
            )
        kwargs["targets"] = target_modules if target_modules is not None else kwargs.get("targets")
        super().__init__(
            r=r, alpha=alpha, dropout=dropout, merge=merge, reproject=reproject, **kwargs
        )
        self._trainable: list[str] = []
        self._started = 0.0
        self._fit_record = FitRecorder(self)  # every checkpoint until finish says what it holds

    # -- fit: inject at setup (before the optimizer and any checkpoint restore) -----------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.FITTING or self.already_applied(pl_module):
            return
        if lora_layers(pl_module):
            raise PPQConfigError(
                f"{self.name}: the model already carries LoRA adapters "
                f"({', '.join(list(lora_layers(pl_module))[:3])}); one LoRA stage per model."
            )
        trace_default_boundary(pl_module, self.targets, trainer, None, self.forward_fn)
        modules = resolve_targets(pl_module, self.targets, self.ignore)
        self.check_grouped_convs(modules)
        check_runs_modules(modules, "LoRA adapters (their forward adds B A x)")
        self._trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(modules),
            bias="none",
        )
        inject_adapter_in_model(config, pl_module, adapter_name=ADAPTER)
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad = ".lora_" in name
        self._fit_record.attach(trainer, pl_module, list(lora_layers(pl_module)))

    def check_grouped_convs(self, modules: dict[str, nn.Module]) -> None:
        """peft adapts a grouped convolution only when ``r`` is a multiple of its groups, and
        builds a convolution's ``lora_A`` with its kernel, stride and padding but neither its
        dilation nor its padding mode: on a dilated convolution (a WaveNet's, a TCN's) the
        adapter's output has another length and the first forward fails; with reflect or
        circular padding it adds zero-padded patches to reflected ones.

        Raises:
            PPQConfigError: naming the first layer where ``r`` is not a multiple of its groups,
                or that is dilated or padded other than with zeros, before any adapter exists.
        """
        for name, module in modules.items():
            if is_convolution(module) and (
                any(d != 1 for d in module.dilation) or module.padding_mode != "zeros"
            ):
                raise PPQConfigError(
                    f"LoRAFineTune cannot adapt {name}, a {type(module).__name__} with "
                    f"dilation={module.dilation}, padding_mode={module.padding_mode!r}: peft "
                    "builds its adapter without the dilation and with zero padding, so the "
                    "adapter would not see the layer's patches. Leave it out "
                    f"(ignore={name!r}); LoRA adapts undilated, zero-padded convolutions."
                )
            groups = module.groups if is_convolution(module) else 1
            if groups > 1 and self.r % groups:
                raise bad_value(
                    "r",
                    self.r,
                    f"a multiple of the groups of every targeted grouped convolution; {name} "
                    f"has groups={groups} (list it in `ignore`, e.g. depthwise convolutions)",
                )

    def check_ahead(self, model: nn.Module, earlier: list[CompressionCallback]) -> None:
        """In a schedule: refuse ``merge='at_end'`` with ``reproject=False`` after a stage that
        prunes or quantizes, before that stage runs (the merge would leave its mask and grid).

        Raises:
            PPQConfigError: naming the earlier stage (or what the base check raises).
        """
        super().check_ahead(model, earlier)
        if self.merge == "at_end" and not self.reproject:
            for stage in earlier:
                kind = StageKind(stage.kind)
                if kind.prunes or kind.quantizes:
                    raise PPQConfigError(
                        f"merge='at_end' with reproject=False is not allowed after stage "
                        f"{stage.name!r} ({kind}): it prunes or quantizes the bases, and W + BA "
                        "would leave their mask and grid. Use reproject=True (re-project onto "
                        "them), merge='never', or put the fine-tune first."
                    )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before training, a merge that would break a compressed base."""
        self._started = time.perf_counter()
        if self.merge != "at_end" or self.reproject or self.already_applied(pl_module):
            return
        for name, layer in lora_layers(pl_module).items():
            base = layer.get_base_layer()
            if current_mask(base) is not None or current_grid(base) is not None:
                raise PPQConfigError(
                    f"merge='at_end' with reproject=False is not allowed for {name}: its base is "
                    "pruned or quantized, and W + BA would leave its mask and grid. Use "
                    "reproject=True (re-project onto them) or merge='never'."
                )

    def finish(self, model: nn.Module, index: int = 1) -> StageResult:
        """End the stage on ``model``: merge or keep the adapters, record, and summarise."""
        self._fit_record.detach()
        entry = self.history_entry()
        layers: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                base = layer.get_base_layer()
                delta, w = adapter_update(layer), weight_matrix(base).float()
                metrics = {"delta_norm": (delta.norm() / w.norm().clamp_min(1e-12)).item()}
                if self.merge == "at_end":
                    metrics["projection_loss"] = merge_adapter(model, name, layer)
                    record_stage(base, entry)
                else:
                    metrics["adapter_params"] = float(keep_adapter(layer, entry))
                layers[name] = metrics
        if self.merge == "at_end":
            trainable = set(self._trainable)
            for name, parameter in model.named_parameters():
                parameter.requires_grad = name in trainable
        seconds = time.perf_counter() - self._started if self._started else 0.0
        return self.conclude(model, index, layers, seconds)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._fit_record.detach()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fit_record.detach()  # a fit that ended before training did (max_steps=0)
        super().teardown(trainer, pl_module, stage)
