"""The contract every compression method follows: a Lightning Callback that fires once.

A :class:`CompressionCallback` compresses the modules chosen by ``targets``/``ignore`` once,
before the first evaluation of ``validate``/``test``/``predict`` or at the start of ``fit``.
In ``Trainer(callbacks=[...])`` the list order is the compression order. The stage is recorded
on every module it touched (``ppq_lightning.compressed``), so a run resumed from a checkpoint of
an already-compressed model never applies it twice.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ppq_lightning.calibration.data import default_forward
from ppq_lightning.callbacks.fit_moment import FitMoment
from ppq_lightning.callbacks.never_fired import never_fired_error
from ppq_lightning.compressed.accounting import CompressionSummary, compression_summary
from ppq_lightning.compressed.history import HistoryEntry, StageKind, kind_of
from ppq_lightning.compressed.state import applied_stages, compressed_modules, get_state
from ppq_lightning.compressed.upkeep import mask_gradients, project_onto_state
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import (
    CompressionError,
    PPQConfigError,
    bad_value,
    check_bool,
    check_choice,
    check_int,
)
from ppq_lightning.modules.config import StageConfig, identity, is_legacy_key
from ppq_lightning.modules.rollback import restored_on_error
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.tree import find_module
from ppq_lightning.modules.views import check_finite, weight_matrix
from ppq_lightning.ops.quant_grid import check_group_size

COMMON_FIELDS = frozenset(f.name for f in fields(StageConfig))
"""The config fields every method has (``targets``, ``ignore``); a history entry leaves them to
its state key."""


@dataclass
class StageResult:
    """What one stage did.

    Attributes:
        index: position of the stage in the compression order (1-based).
        name: the stage's name (``magnitude``, ``rtn``, or the user's ``name``), used in
            metric keys.
        kind: the :class:`~ppq_lightning.compressed.history.StageKind` letter: ``"P"``
            (pruning), ``"Q"`` (quantization), ...
        config: the arguments that define the stage.
        layers: per-layer metrics, ``{module name: {metric: value}}``.
        summary: compression of the whole model after the stage.
        seconds: wall time of the stage.
        evaluation: metrics of the model after the stage (filled by ``CompressionSchedule``).
    """

    index: int
    name: str
    kind: str
    config: dict[str, Any]
    layers: dict[str, dict[str, float]]
    summary: CompressionSummary
    seconds: float
    evaluation: dict[str, float] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"stage/{self.index}_{self.name}"

    def metrics(self, log_layers: bool = True) -> dict[str, float]:
        """Flat, namespaced metrics for a Lightning logger."""
        out = {f"{self.prefix}/{k}": float(v) for k, v in self.summary.as_dict().items()}
        out[f"{self.prefix}/seconds"] = self.seconds
        out.update({f"{self.prefix}/{k}": float(v) for k, v in self.evaluation.items()})
        if log_layers:
            for name, values in self.layers.items():
                for key, value in values.items():
                    out[f"layer/{self.index}_{self.name}/{name}/{key}"] = float(value)
        return out


def log_metrics(trainer: L.Trainer | None, metrics: dict[str, float]) -> None:
    """Send metrics to every logger of ``trainer`` (from rank zero only)."""
    if trainer is None or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def log_layer_table(trainer: L.Trainer | None, result: StageResult) -> None:
    """Send a stage's per-layer metrics as one table (``layers/<i>_<name>``: a row per module,
    a column per metric) to the loggers that take tables (``WandbLogger``: a ``wandb.Table``);
    other loggers get the same numbers as ``layer/...`` scalars from :func:`log_metrics`."""
    if trainer is None or not trainer.is_global_zero or not result.layers:
        return
    columns = sorted({metric for values in result.layers.values() for metric in values})
    data = [[name, *(values.get(c) for c in columns)] for name, values in result.layers.items()]
    for logger in trainer.loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(
                key=f"layers/{result.index}_{result.name}", columns=["module", *columns], data=data
            )


def configured_stages(callbacks: Iterable[Any]) -> list[CompressionCallback]:
    """The compression stages among ``callbacks`` (a Trainer's), a schedule's stages included,
    in callback order."""
    return [s for cb in callbacks if isinstance(cb, FiresOnce) for s in cb.compression_stages()]


def check_trainer_stages(callbacks: Iterable[Any], model: nn.Module | None = None) -> None:
    """Refuse compression stages that cannot run together in one Trainer, or on ``model``.

    Every compression callback runs it at ``setup``, before any of them changes the model.

    Args:
        callbacks: the Trainer's callbacks (``trainer.callbacks``); the stages of a
            ``CompressionSchedule`` count as its own.
        model: the model the stages are about to compress; None to skip
            :meth:`CompressionCallback.check_not_replaced`.

    Raises:
        PPQConfigError: naming the stages, when one stage is given twice (e.g. in a schedule
            and to the Trainer), two stages have one ``state_key`` (the same method with the
            same arguments: they need distinct ``name`` arguments), more than one stage
            trains (LoRA, QAT, CoDeQ: one training stage per fit), or ``model`` records
            another stage under the name of one of them.
    """
    stages = configured_stages(callbacks)
    for i, stage in enumerate(stages):
        label = f"{stage.name!r} ({type(stage).__name__})"
        for other in stages[:i]:
            if other is stage:
                raise PPQConfigError(
                    f"stage {label} is given twice to this Trainer (in a CompressionSchedule's "
                    "stages and in trainer.callbacks, or twice in one list): pass it once."
                )
            if other.state_key == stage.state_key:
                raise PPQConfigError(
                    f"two stages {label} have the same arguments, so one state_key "
                    f"{stage.state_key!r}: set `name=` on each to tell them apart (e.g. "
                    f"name='{stage.name}1' and name='{stage.name}2'), or remove one."
                )
    training = [s for i, s in enumerate(stages) if s.trains and s not in stages[:i]]
    if len(training) > 1:
        listed = ", ".join(f"{s.name!r} ({type(s).__name__})" for s in training)
        raise PPQConfigError(
            f"stages train more than once ({listed}): one training stage (LoRA, QAT, CoDeQ) "
            "per fit; run a second fit for another."
        )
    for stage in stages if model is not None else ():
        stage.check_not_replaced(model, stages)


def _default_names() -> dict[str, str]:
    """``{class name: default_name}`` of every compression method defined so far."""
    names, pending = {}, [CompressionCallback]
    while pending:
        cls = pending.pop()
        names.setdefault(cls.__name__, cls.default_name)
        pending += cls.__subclasses__()
    return names


def recorded_name(entry: HistoryEntry) -> str | None:
    """The name of the stage that wrote a history ``entry``: its ``name`` field; for records
    written before entries had one, the name in its state key (``Method{...}@name``, or
    ``Method{'name': ...}`` in keys of version 1), else the default name of its method (None
    when neither can be read)."""
    if isinstance(entry.get("name"), str):
        return entry["name"]
    key, method = entry.get("stage"), entry.get("method")
    if not isinstance(key, str) or not isinstance(method, str) or not key.startswith(method):
        return None
    _, named, name = key.rpartition("}@")  # identity@name
    if named:
        return name
    try:
        arguments = ast.literal_eval(key[len(method) :])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(arguments, dict):
        return None
    return arguments.get("name") or _default_names().get(method)


class FiresOnce(L.Callback):
    """A callback that runs :meth:`_fire` once, at the first of fit/validate/test/predict.

    In ``fit`` it fires at ``on_fit_start`` (subclasses may choose a later moment); the
    validation loops inside ``fit`` never fire it. While ``fit`` trains, the first such callback
    of the Trainer keeps every compressed layer on its mask and grid
    (``ppq_lightning.compressed.upkeep``): pruned gradients are zeroed before each optimizer
    step and trainable compressed weights are projected back after it.
    """

    def __init__(self) -> None:
        self._applied = False

    def _fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def compression_stages(self) -> list[CompressionCallback]:
        """The compression stages this callback applies (a stage: itself; a schedule: its
        stages), for the checks of :func:`check_trainer_stages`."""
        return []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        enable_state_loading(pl_module)  # before Lightning restores a checkpoint into it

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fire(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._fire(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fire(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fire(trainer, pl_module)

    def _keeps_invariants(self, trainer: L.Trainer) -> bool:
        """Whether this is the Trainer's first compression callback (it does the upkeep)."""
        return next(cb for cb in trainer.callbacks if isinstance(cb, FiresOnce)) is self

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self._keeps_invariants(trainer):
            mask_gradients(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._keeps_invariants(trainer):
            project_onto_state(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self._applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._applied = bool(state_dict.get("applied", False))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a run that was to compress and did not: a stage that never fired.

        Lightning calls ``teardown`` at the end of a ``fit``/``validate``/``test``/``predict``
        that finished without an exception (an interrupted run keeps its own exception). The
        first compression callback of the Trainer then checks every stage of the Trainer's
        compression callbacks (a schedule's included): each must be applied, or already
        recorded on the model (a resumed run). A stage that is neither never fired: the
        evaluation loop was skipped (``limit_val_batches=0``, an empty dataloader), or ``fit``
        ended before the stage's ``at_epoch``/``at_step`` or before training ran
        (``max_steps=0``) or ended (the stages after a training stage).

        Args:
            trainer: the Trainer that ran.
            pl_module: its model.
            stage: the Trainer function that ran (``"fit"``, ``"validate"``, ...).

        Raises:
            PPQConfigError: naming the stages that never fired and the likely cause.
        """
        if trainer.interrupted or not self._keeps_invariants(trainer):
            return  # one report, from the first compression callback
        pending = [
            (callback, member)
            for callback in trainer.callbacks
            if isinstance(callback, FiresOnce)
            for member in callback.compression_stages()
            if not member.already_applied(pl_module)
        ]
        if pending:
            raise never_fired_error(trainer, str(TrainerFn(stage).value), pending)


class CompressionCallback(FiresOnce):
    """Base class of every compression method.

    Subclasses set ``default_name`` and ``kind``, define :meth:`stage_config` (the arguments
    that define the stage) and :meth:`compress` (the work on the chosen modules). A stage has
    one name, :attr:`name` (the ``name`` argument, else ``default_name``), used in orders, logs
    and reports, and one identity, :attr:`state_key` (its class and arguments).

    Args:
        targets: regex or list of regexes of module names to compress (``re.search``); default
            every ``nn.Linear``/``nn.Conv2d`` except embeddings and the LM head.
        ignore: regexes of module names to leave uncompressed.
        name: a name for this stage, used in orders, metric keys and its ``state_key``; needed
            when two stages of the same class and arguments are in one run.
        b_orig: bits of an original weight, for compression rates (16 for LLMs, 32 for fp32
            vision models).
        log_layers: also log one metric per layer.
        at_epoch: in ``fit``, fire at the start of this (0-based) training epoch instead of at
            fit start; ignored by ``validate``/``test``/``predict``.
        at_step: in ``fit``, fire before the training batch at this global step.

    When ``fit`` has a training stage (``trains``: LoRA, QAT, CoDeQ) earlier in the Trainer's
    callback list, a stage without ``at_epoch``/``at_step`` fires when training ends, after
    that stage: ``callbacks=[Q, LoRA, P]`` is the order ``Q>L>P``.

    Raises:
        PPQConfigError: on an invalid regex, a ``name`` that is not a non-empty string,
            ``b_orig`` not in {8, 16, 32}, ``log_layers`` not a bool, an ``at_epoch``/
            ``at_step`` that is not an integer >= 0 or both given; at ``setup``, see
            :func:`check_trainer_stages` and :meth:`check_not_replaced`; at run time, when
            ``targets`` match nothing (see also :meth:`check_not_replaced`), when ``at_epoch``
            is not below ``max_epochs`` (or ``at_step`` below ``max_steps``), or when a
            training stage is used outside ``fit`` or through :meth:`apply`.
    """

    default_name: ClassVar[str] = "stage"
    kind: StageKind
    config_class: ClassVar[type[StageConfig]] = StageConfig  # the method's arguments
    trains: ClassVar[bool] = False  # acts during fit's training (LoRA, QAT, CoDeQ)
    edits_structure: ClassVar[bool] = False  # replaces or reshapes layers (blocks, channels)

    def __init__(
        self,
        *,
        targets: str | list[str] | None = None,
        ignore: str | list[str] | None = None,
        name: str | None = None,
        b_orig: int = 16,
        log_layers: bool = True,
        at_epoch: int | None = None,
        at_step: int | None = None,
        **arguments: Any,
    ) -> None:
        super().__init__()
        for argument, value in (("at_epoch", at_epoch), ("at_step", at_step)):
            if value is not None and self.trains:
                raise bad_value(argument, value, "None: a training stage trains for the whole fit")
            check_int(argument, value, minimum=0, allow_none=True)
        if at_epoch is not None and at_step is not None:
            raise PPQConfigError(
                f"at_epoch={at_epoch!r} and at_step={at_step!r} are not allowed together: "
                "give one of them (or neither, to fire at fit start)."
            )
        self.at_epoch, self.at_step = at_epoch, at_step
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise PPQConfigError(f"name={name!r} is not allowed: expected a non-empty string.")
        check_choice("b_orig", b_orig, (8, 16, 32))
        check_bool("log_layers", log_layers)
        self._name, self.b_orig, self.log_layers = name, b_orig, log_layers
        self.config = self.config_class(targets=targets, ignore=ignore, **arguments)
        self.result: StageResult | None = None
        self.forward_fn: Callable[[nn.Module, Any], Any] | None = None

    @property
    def model_forward(self) -> Callable[[nn.Module, Any], Any]:
        """How this stage calls the model on a calibration batch: ``forward_fn(model, batch)``
        when set (a model whose batches ``calibration.data.batch_input`` cannot read), else
        ``calibration.data.default_forward``."""
        return self.forward_fn or default_forward

    def __getattr__(self, item: str) -> Any:
        """The fields of :attr:`config` read as attributes (``stage.bits``)."""
        config = self.__dict__.get("config")
        if config is not None and item in config.__dataclass_fields__:
            return getattr(config, item)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {item!r}")

    # -- what subclasses define -------------------------------------------------------------
    def stage_config(self) -> dict[str, Any]:
        """The arguments that define this stage: every field of :attr:`config`, canonical
        (recorded in each module's history; :attr:`identity` is derived from them)."""
        return self.config.arguments()

    def compress(
        self, model: nn.Module, modules: dict[str, nn.Module]
    ) -> dict[str, dict[str, float]]:
        """Compress ``modules`` of ``model`` in place, record their state, and return per-layer
        metrics ``{module name: {metric: value}}``.

        Raises:
            PPQConfigError: for a training stage (``trains``), which compresses in ``fit``
                only (:meth:`finish`), never at once.
        """
        if self.trains:
            raise self.outside_fit("apply()")
        raise NotImplementedError

    def check_layers(self, modules: dict[str, nn.Module]) -> None:
        """Raise a ``PPQConfigError`` (naming the layer) when the stage cannot compress one of
        ``modules``; called for every layer before any weight changes. Here: a stage that
        quantizes with a ``group_size`` needs it to divide every layer's input dimension
        (subclasses that add checks call this one too)."""
        group_size = getattr(self, "group_size", None)
        if group_size is not None and StageKind(self.kind).quantizes:
            for name, module in modules.items():
                check_group_size(group_size, weight_matrix(module).shape[1], f"group_size ({name})")

    def check_ahead(self, model: nn.Module, earlier: list[CompressionCallback]) -> None:
        """What a :class:`CompressionSchedule` checks for this stage before its first stage
        changes any weight: the targets, :meth:`check_layers` and finite weights, on the model
        as it is (skipped after a stage that changes the model's structure, ``edits_structure``:
        the layers this stage will see do not exist yet). Stages that depend on what the
        ``earlier`` stages of the schedule do override it (and call it).

        Raises:
            PPQConfigError: what :meth:`apply` would raise for these reasons later.
        """
        if any(stage.edits_structure for stage in earlier):
            return
        modules = resolve_targets(model, self.targets, self.ignore)
        self.check_layers(modules)
        check_finite(modules, f"stage {self.name!r}: cannot compress")

    # -- shared machinery ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        """What the stage is called in orders, logs and reports: ``name``, else the method's."""
        return self._name or self.default_name

    @property
    def identity(self) -> str:
        """What the stage computes: its method and every argument that can change the weights it
        produces (``config``), never its ``name``; a study's cells are keyed by it, so two stages
        that differ only by name share cells."""
        return identity(type(self).__name__, self.stage_config())

    @property
    def state_key(self) -> str:
        """This stage in a run and in a model's history: its :attr:`identity`, and its ``name``
        when one is given (``identity@name``: a deliberate second stage of one identity). The
        history, the resume skip and the "already applied" refusal compare it; Lightning keeps
        the callback's state under it."""
        return self.identity if self._name is None else f"{self.identity}@{self._name}"

    def history_entry(self) -> HistoryEntry:
        """The record appended to the history of every module this stage touches: the state
        key (which holds every argument), and the method's own arguments that have a value
        (``bits``, ``sparsity``, ``pattern``, the calibration settings, ...; not ``targets``
        or ``ignore``, which only the key holds: every module carries this record)."""
        arguments = {
            k: v for k, v in self.stage_config().items() if v is not None and k not in COMMON_FIELDS
        }
        return {
            "stage": self.state_key,
            "method": type(self).__name__,
            "kind": StageKind(self.kind).value,
            "name": self.name,
            **arguments,
        }

    def compression_stages(self) -> list[CompressionCallback]:
        return [self]

    def outside_fit(self, where: str) -> PPQConfigError:
        """The error of a training stage used ``where`` (``"apply()"``, ``"`validate`"``)."""
        return PPQConfigError(
            f"{type(self).__name__} trains: it belongs in `fit` (trainer.fit / ppq fit, as a "
            f"Trainer callback or a stage of a CompressionSchedule), not in {where}; stage "
            f"{self.name!r} cannot be applied to a model at once."
        )

    def check_not_replaced(
        self, model: nn.Module, configured: Iterable[CompressionCallback] = ()
    ) -> None:
        """Refuse to stack this stage on a model whose history records another stage of the
        same name: a resumed or reloaded run whose configuration of that stage changed.

        Args:
            model: the model about to be compressed.
            configured: the other stages of this run; what they recorded is expected.

        Raises:
            PPQConfigError: saying what is recorded, what is configured, and the choices.
        """
        expected = {self.state_key} | {s.state_key for s in configured}
        recorded = sorted(
            {
                entry["stage"]
                for _, _, state in compressed_modules(model)
                for entry in state.history
                if entry.get("stage") not in expected and recorded_name(entry) == self.name
            }
        )
        legacy = [key for key in recorded if is_legacy_key(key)]
        if legacy:
            raise PPQConfigError(
                f"stage {self.name!r}: the model records a stage {self.name!r} as {legacy[0]}, "
                "written by an earlier ppq-lightning whose stage identities left out arguments "
                "that change the weights (targets, ignore, damping, calibration settings), so "
                f"whether it is this run's {self.state_key} cannot be known. Compress a dense "
                "model again with this version (the model's weights are kept as they are)."
            )
        if recorded:
            raise PPQConfigError(
                f"stage {self.name!r}: the model already records a stage {self.name!r} as "
                f"{recorded[0]}, but this run configures {self.state_key}; applying it would "
                f"stack a second {self.name!r} stage on the first. Load a dense model (or use "
                "the configuration the model was compressed with), or give the new stage "
                "another `name` to stack it deliberately."
            )

    def apply(
        self,
        model: nn.Module,
        trainer: L.Trainer | None = None,
        index: int = 1,
        dataloader: Iterable[Any] | None = None,
    ) -> StageResult:
        """Compress ``model`` now (usable without a Trainer) and return what was done.

        Args:
            model: the model (or LightningModule) to compress in place.
            trainer: the running Trainer, if any (gives methods access to calibration data).
            index: position of this stage in the compression order, for metric keys.
            dataloader: calibration data for methods that need it, instead of the trainer's.

        Everything that can be checked is checked before any weight changes (targets, the
        layers' shapes, finite weights, the stage not already recorded on the model); if the
        stage fails part-way (NaN activations in a late block, say), every layer it was
        compressing is restored before the error propagates (``modules.rollback``).

        Raises:
            PPQConfigError: when ``targets``/``ignore`` select no module, a selected layer has a
                NaN/Inf weight or cannot be compressed by this stage, or this stage is
                already recorded on ``model``.
            CompressionError: when the stage produced a non-finite weight (the layers are
                restored).
        """
        self.trainer, self.dataloader = trainer, dataloader
        if self.state_key in applied_stages(model):
            raise PPQConfigError(
                f"stage {self.name!r} ({self.state_key}) is already applied to this model: its "
                "layers' history records it, and applying it again would compress them twice. "
                "Apply it to a fresh model, or give a deliberate second stage another `name`."
            )
        modules = resolve_targets(model, self.targets, self.ignore)
        adapted = [  # bases whose trained LoRA adapters were kept separate
            name
            for name, module in modules.items()
            if name.endswith(".base_layer")
            and any(kind_of(e) is StageKind.LORA for e in getattr(get_state(module), "history", ()))
        ]
        if adapted and StageKind(self.kind).prunes:
            rank_zero_warn(
                f"[ppq] {self.name} prunes the base weights of {len(adapted)} layer(s) "
                "that carry unmerged LoRA adapters; the adapters stay dense, so the effective "
                "weight W + BA is not sparse (merge them first: LoRAFineTune(merge='at_end'))."
            )
        parameters = {id(p) for p in model.parameters()}
        start = time.perf_counter()
        self.check_layers(modules)
        check_finite(modules, f"stage {self.name!r}: cannot compress")
        with restored_on_error(model, modules), torch.inference_mode(False), torch.no_grad():
            layers = self.compress(model, modules)
            after = {n: find_module(model, n) for n in modules}
            check_finite(after, f"stage {self.name!r} produced", CompressionError)
        seconds = time.perf_counter() - start
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if fitting and any(id(p) not in parameters for p in model.parameters()):
            trainer.strategy.setup_optimizers(trainer)  # new parameters (factors): train them
        return self.conclude(model, index, layers, seconds)

    def conclude(
        self, model: nn.Module, index: int, layers: dict[str, dict[str, float]], seconds: float
    ) -> StageResult:
        """Mark the stage applied and build its :class:`StageResult` (``self.result``)."""
        summary = compression_summary(model, self.b_orig)
        self.result = StageResult(
            index,
            self.name,
            StageKind(self.kind).value,
            self.stage_config(),
            layers,
            summary,
            seconds,
        )
        self._applied = True
        return self.result

    def already_applied(self, model: nn.Module) -> bool:
        """Whether this stage is recorded in ``model`` (a resumed or reloaded run)."""
        return self._applied or self.state_key in applied_stages(model)

    # -- when it fires in fit -------------------------------------------------------------
    def _stages(self, trainer: L.Trainer) -> list[CompressionCallback]:
        """The Trainer's compression callbacks, in list (= compression) order."""
        return [cb for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]

    def _index(self, trainer: L.Trainer) -> int:
        """This stage's 1-based position in the compression order (1 outside the list)."""
        stages = self._stages(trainer)
        return stages.index(self) + 1 if self in stages else 1

    def fit_moment(self, trainer: L.Trainer) -> FitMoment:
        """When this stage fires in ``fit`` (see :class:`FitMoment`)."""
        if self.trains:
            return FitMoment.TRAIN
        if self.at_epoch is not None:
            return FitMoment.EPOCH
        if self.at_step is not None:
            return FitMoment.STEP
        stages = self._stages(trainer)
        if self in stages and any(cb.trains for cb in stages[: stages.index(self)]):
            return FitMoment.END
        return FitMoment.START

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the Trainer's stages together and against the model's history (before any
        stage changes a weight), then the timing arguments in ``fit``.

        Raises:
            PPQConfigError: see :func:`check_trainer_stages`; in ``fit``, an ``at_epoch``/
                ``at_step`` beyond ``max_epochs``/``max_steps``.
        """
        super().setup(trainer, pl_module, stage)
        check_trainer_stages(trainer.callbacks, pl_module)
        if stage != TrainerFn.FITTING:
            return
        epochs, steps = trainer.max_epochs, trainer.max_steps
        if self.at_epoch is not None and epochs not in (None, -1) and self.at_epoch >= epochs:
            raise bad_value("at_epoch", self.at_epoch, f"an epoch below max_epochs={epochs}")
        if self.at_step is not None and steps not in (None, -1) and self.at_step >= steps:
            raise bad_value("at_step", self.at_step, f"a step below max_steps={steps}")

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A run resumed with ``ckpt_path``: the restored model's history is known only now
        (after ``setup``); check the stages against it before any of them fires.

        Raises:
            PPQConfigError: see :meth:`check_not_replaced`.
        """
        check_trainer_stages(trainer.callbacks, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_moment(trainer) is FitMoment.START:
            self._fire(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_epoch is not None and trainer.current_epoch >= self.at_epoch:
            self._fire(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.at_step is not None and trainer.global_step >= self.at_step:
            self._fire(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        moment = self.fit_moment(trainer)
        if moment is FitMoment.END:
            self._fire(trainer, pl_module)
        elif moment is FitMoment.TRAIN and not (self._applied or self.already_applied(pl_module)):
            self.log_result(trainer, self.finish(pl_module, self._index(trainer)))

    def finish(self, model: nn.Module, index: int = 1) -> StageResult:
        """End a training stage (``trains``) on ``model`` when training ends: write and record
        its result, and return it (see :meth:`conclude`). Training stages define it."""
        raise NotImplementedError

    def _fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._applied:
            return
        if self.already_applied(pl_module):
            self._applied = True
            rank_zero_info(f"[ppq] {self.state_key} is already applied to this model; skipped.")
            return
        self.check_not_replaced(pl_module, configured_stages(trainer.callbacks))
        if self.trains:
            raise self.outside_fit(f"`{trainer.state.fn}`")
        self.log_result(trainer, self.apply(pl_module, trainer, index=self._index(trainer)))

    def log_result(self, trainer: L.Trainer | None, result: StageResult) -> None:
        """Log a finished stage: metrics, the per-layer table and one summary line."""
        log_metrics(trainer, result.metrics(self.log_layers))
        log_layer_table(trainer, result)
        rank_zero_info(
            f"[ppq] stage {result.index} {result.name}: sparsity {result.summary.sparsity:.3f}, "
            f"bits {result.summary.avg_bits:.2f}, measured C {result.summary.measured_C:.2f} "
            f"({result.seconds:.1f}s)"
        )
