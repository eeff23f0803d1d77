"""A compression stage: its config, its identity, and applying it to a model (with rollback).

:class:`CompressionStage` is everything a method is without Lightning's hooks: the frozen config
of its arguments (``config_class``), its name, identity and state key, the history entry it
records, the checks made before any weight changes, and :meth:`~CompressionStage.apply`, which
compresses a model at once and restores the layers if it fails part-way. The Lightning adapter,
``callbacks.base.CompressionCallback``, adds when it fires and what it logs.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ppq_lightning.calibration.boundary import trace_default_boundary
from ppq_lightning.calibration.data import CalibrationData, calibration_data, default_forward
from ppq_lightning.compressed.accounting import CompressionSummary, compression_summary
from ppq_lightning.compressed.history import HistoryEntry, StageKind, kind_of
from ppq_lightning.compressed.invariants import (
    check_invariants,
    checks_after_stages,
    indistinct_grids,
)
from ppq_lightning.compressed.state import applied_stages, compressed_modules, get_state
from ppq_lightning.errors import (
    CompressionError,
    PPQConfigError,
    bad_value,
    check_bool,
    check_choice,
)
from ppq_lightning.modules.config import StageConfig, identity, is_legacy_key
from ppq_lightning.modules.mixed_precision import assign_grids
from ppq_lightning.modules.offload import DiskWeights, disk_weights
from ppq_lightning.modules.rollback import restored_on_error
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.tree import find_module
from ppq_lightning.modules.views import check_finite, weight_matrix
from ppq_lightning.ops.grid_formats import GridSpec

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
        calibration: where the stage's calibration batches came from and how many it used
            (``calibration_data``, ``calibration_batches``: see
            ``CompressionStage.calibration_record``); empty for a stage that reads no data.
    """

    index: int
    name: str
    kind: str
    config: dict[str, Any]
    layers: dict[str, dict[str, float]]
    summary: CompressionSummary
    seconds: float
    evaluation: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"stage/{self.index}_{self.name}"

    def metrics(self, log_layers: bool = True) -> dict[str, float]:
        """Flat, namespaced metrics for a Lightning logger."""
        out = {f"{self.prefix}/{k}": float(v) for k, v in self.summary.as_dict().items()}
        out[f"{self.prefix}/seconds"] = self.seconds
        out.update({f"{self.prefix}/{k}": float(v) for k, v in self.evaluation.items()})
        if "calibration_batches" in self.calibration:
            out[f"{self.prefix}/calibration_batches"] = float(
                self.calibration["calibration_batches"]
            )
        if log_layers:
            for name, values in self.layers.items():
                for key, value in values.items():
                    out[f"layer/{self.index}_{self.name}/{name}/{key}"] = float(value)
        return out


def _default_names() -> dict[str, str]:
    """``{class name: default_name}`` of every compression method defined so far."""
    names, pending = {}, [CompressionStage]
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


class GridPrecisionWarning(UserWarning):
    """A quantization grid that the weight's dtype cannot hold level by level (see
    :func:`warn_indistinct_grids`)."""


def warn_indistinct_grids(stage: str, model: nn.Module, layers: Iterable[str]) -> None:
    """Warn once for a stage whose grids have neighbouring levels that the weight's dtype
    rounds to one value (an asymmetric 8-bit grid on a bf16 model: ``|k - zero| > 128``).

    The weights stay exactly on the grid as the dtype holds it (each is a float32 grid value
    rounded once), so the invariants hold and the result is what the model computes; but those
    layers hold fewer distinct values than the bit width says, and where the quantizer chose one
    of two levels that round alike, the code read back (and exported) is the other's.

    Args:
        stage: the stage's name, for the message.
        model: the model the stage compressed.
        layers: the names of the layers it compressed.
    """
    found = indistinct_grids(model, layers)
    if not found:
        return
    first = next(iter(found))
    pairs, dtype = found[first]
    rank_zero_warn(
        f"[ppq] stage {stage!r}: in {len(found)} layer(s) (first {first}: {pairs} pair(s) of "
        f"levels) neighbouring grid levels round to the same {dtype} value, so those layers hold "
        f"fewer distinct values than their bit width; the weights are on the grid as {dtype} "
        "holds it, and a code read back or exported there is the nearest level's. To keep every "
        "level distinct, quantize symmetrically (bf16 holds 8-bit symmetric grids exactly) or "
        "hold the model in float16 or float32 (see docs/scale.md, 'bf16 and fp16').",
        category=GridPrecisionWarning,
    )


class CompressionStage:
    """A compression method's stage, applied at once to a model (no Lightning hooks).

    Subclasses set ``default_name``, ``kind`` and ``config_class`` (a frozen config whose
    fields are every argument that can change the weights) and define :meth:`compress`. A stage
    has one name, :attr:`name` (the ``name`` argument, else ``default_name``), used in orders,
    logs and reports; one identity, :attr:`identity` (its method and config, never its name);
    and one key in a run and a model's history, :attr:`state_key` (the identity, ``@name``
    when a name is given).

    Args:
        targets, ignore: module-name regexes (see ``modules.config.StageConfig``).
        name: a name for this stage (orders, metric keys, ``state_key``).
        b_orig: bits of an original weight, for compression rates (16 for LLMs, 32 for fp32
            vision models).
        log_layers: also log one metric per layer.
        forward_fn: how the stage calls the model on a calibration batch,
            ``forward_fn(model, batch)``, for a batch the default forward cannot read
            (``calibration.data.forward_call``), e.g. ``lambda model, batch:
            model(batch["image"])``; None for the default. Not part of the identity.
        **arguments: the method's own arguments, fields of ``config_class``.

    Raises:
        PPQConfigError: a ``name`` that is not a non-empty string, ``b_orig`` not in
            {8, 16, 32}, ``log_layers`` not a bool, ``forward_fn`` not callable, or what the
            config refuses.
    """

    default_name: ClassVar[str] = "stage"
    kind: StageKind
    config_class: ClassVar[type[StageConfig]] = StageConfig  # the method's arguments
    trains: ClassVar[bool] = False  # acts during fit's training (LoRA, QAT, CoDeQ)
    edits_structure: ClassVar[bool] = False  # replaces or reshapes layers (blocks, channels)
    runs_model: ClassVar[bool] = False  # runs the model on a batch whatever its config says
    reads_layer_inputs: ClassVar[bool] = False  # needs every target to run in the forward
    streams_blocks: ClassVar[bool] = False  # holds one block at a time itself (the engine)

    def __init__(
        self,
        *,
        targets: str | list[str] | None = None,
        ignore: str | list[str] | None = None,
        name: str | None = None,
        b_orig: int = 16,
        log_layers: bool = True,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        **arguments: Any,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise PPQConfigError(f"name={name!r} is not allowed: expected a non-empty string.")
        check_choice("b_orig", b_orig, (8, 16, 32))
        check_bool("log_layers", log_layers)
        if forward_fn is not None and not callable(forward_fn):
            raise bad_value("forward_fn", forward_fn, "None or a callable forward_fn(model, batch)")
        self._name, self.b_orig, self.log_layers = name, b_orig, log_layers
        self._check_known(arguments)
        if "b_orig" in self.config_class.__dataclass_fields__:  # its math reads B_orig
            arguments["b_orig"] = b_orig
        try:
            self.config = self.config_class(targets=targets, ignore=ignore, **arguments)
        except PPQConfigError as error:  # which stage of a schedule or a YAML it was
            stage = f"{type(self).__name__}" + (f" {name!r}" if name is not None else "")
            raise PPQConfigError(f"{stage}: {error}") from None
        self.result: StageResult | None = None
        self.forward_fn = forward_fn
        self.trainer: L.Trainer | None = None
        self.dataloader: Iterable[Any] | None = None
        self.calibration: CalibrationData | None = None
        self._applied = False

    def _check_known(self, arguments: dict[str, Any]) -> None:
        """Refuse an argument the method does not take (``Wanda(nsamples=4)``), naming the ones
        it takes, before its config is built.

        Raises:
            PPQConfigError: naming the method, the unknown arguments and the allowed ones.
        """
        fields = set(self.config_class.__dataclass_fields__)
        unknown = sorted(set(arguments) - fields)
        if not unknown:
            return
        allowed = fields | {  # and every named argument of the classes' __init__
            n
            for klass in type(self).__mro__
            if "__init__" in vars(klass) and klass is not object
            for n, p in inspect.signature(vars(klass)["__init__"]).parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        raise PPQConfigError(
            f"{type(self).__name__} got {', '.join(map(repr, unknown))}, which it does not "
            f"take: its arguments are {', '.join(sorted(allowed))}."
        )

    @property
    def model_forward(self) -> Callable[[nn.Module, Any], Any]:
        """How this stage calls the model on a calibration batch: ``forward_fn(model, batch)``
        when set (a model whose batches the default forward cannot map onto its signature),
        else ``calibration.data.default_forward``."""
        return self.forward_fn or default_forward

    def calls_model(self) -> bool:
        """Whether the stage runs the model on calibration batches: a stage that declares it
        (``runs_model``: DepGraph pruning and BatchNorm folding trace one batch) or whose config
        has ``num_calibration_batches`` (GPTQ, SparseGPT, Wanda, SLEB, ...). A stage that reads
        data only for some arguments overrides it."""
        return self.runs_model or "num_calibration_batches" in self.config.__dataclass_fields__

    def calibration_batches(self, num_batches: int) -> list[Any]:
        """This stage's calibration batches (``calibration.data.calibration_data``, from
        :meth:`apply`'s ``dataloader`` or the running Trainer), recorded in :attr:`calibration`
        for the stage's result and report, saying once what a user would not see otherwise: a
        dataloader shorter than ``num_batches`` (the stage calibrates on what there is), and
        calibration data that is the data the run evaluates on (``validate`` without a
        ``calibration_dataloader()``).

        Raises:
            PPQConfigError: see ``calibration.data.calibration_data``.
        """
        data = calibration_data(self.trainer, num_batches, self.dataloader)
        self.calibration = data
        label = f"stage {self.name!r} ({type(self).__name__})"
        if data.short:
            per_rank = " on this rank" if data.requested < num_batches else ""
            rank_zero_warn(
                f"[ppq] {label}: num_calibration_batches={num_batches}, but {data.origin} has "
                f"only {data.taken} batch(es){per_rank}: it calibrates on {data.taken}. Give it "
                f"more calibration data, or set num_calibration_batches={data.taken} to ask for "
                "what there is."
            )
        if data.evaluation:
            rank_zero_warn(
                f"[ppq] calibrating on {data.origin}, the data this run evaluates on: "
                f"`{self.trainer.state.fn.value}` has no training data, so the stages calibrate "
                "on the batches their result is measured on. Give the datamodule a "
                "calibration_dataloader() (or pass calibration data to stage.apply) to "
                "calibrate on other data; the stage's report records the source."
            )
        return data.batches

    def runs_default_forward(self) -> bool:
        """Whether the stage calls the model through the default forward: it runs the model
        (:meth:`calls_model`) and has no ``forward_fn``."""
        return self.forward_fn is None and self.calls_model()

    def __setattr__(self, item: str, value: Any) -> None:
        """Refuse to set a config field on the stage: the config is frozen, and a stage whose
        weights-changing argument changed after it was built would keep its old identity.

        Raises:
            PPQConfigError: naming the field and how to get a stage with another value.
        """
        config = self.__dict__.get("config")
        if config is not None and item in config.__dataclass_fields__:
            raise PPQConfigError(
                f"{type(self).__name__}.{item} is a field of the stage's frozen config (it is "
                f"part of the stage's identity): build a new stage with {item}={value!r} "
                "instead of setting it."
            )
        super().__setattr__(item, value)

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
        quantizes needs every layer's grid (the stage's, or what ``layer_bits`` and the
        ``Q4_K_M`` mixture give it) to hold the layer's shape: a ``group_size`` dividing its
        input dimension, the blocks of its format (subclasses that add checks call this one
        too)."""
        grid = getattr(self.config, "grid", None)
        if isinstance(grid, GridSpec) and StageKind(self.kind).quantizes:
            layer_bits = getattr(self.config, "layer_bits", None)
            refused: dict[str, PPQConfigError] = {}
            for name, spec in assign_grids(modules, grid, layer_bits).items():
                if not spec.off:
                    try:
                        spec.check_shape(tuple(weight_matrix(modules[name]).shape), name)
                    except PPQConfigError as error:
                        refused[name] = error
            if refused:
                name, error = next(iter(refused.items()))
                fix = self._shape_fix(list(refused), len(modules))
                raise PPQConfigError(f"{error} {fix}") from error

    def _shape_fix(self, names: list[str], n_layers: int) -> str:
        """What to change when the grids of layers ``names`` (of ``n_layers`` targets) cannot
        hold their shapes: leave the layer out, or (a stage with ``layer_bits``) give it a grid
        any width fits; with several, how many there are and a grid every layer holds."""
        if len(names) > 1:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            fix = f"{len(names)} of the {n_layers} target layers cannot hold it ({shown}): "
            fix += "choose a format they hold, or leave them out with ignore"
            if "layer_bits" in self.config_class.__dataclass_fields__:
                fix += " or give them another grid with layer_bits (fp8 holds any width)"
            return fix + "."
        pattern = f"^{re.escape(names[0])}$"
        fix = f"Leave the layer out with ignore=[{pattern!r}]"
        if "layer_bits" in self.config_class.__dataclass_fields__:
            fix += f", or give it another grid: layer_bits={{{pattern!r}: 'fp8'}} (16: unquantized)"
        return fix + "."

    def check_ahead(self, model: nn.Module, earlier: list[CompressionStage]) -> None:
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
        trace_default_boundary(
            model, self.targets, self.trainer, self.dataloader, self.forward_fn, quiet=True
        )
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

    def outside_fit(self, where: str) -> PPQConfigError:
        """The error of a training stage used ``where`` (``"apply()"``, ``"`validate`"``)."""
        return PPQConfigError(
            f"{type(self).__name__} trains: it belongs in `fit` (trainer.fit / ppq fit, as a "
            f"Trainer callback or a stage of a CompressionSchedule), not in {where}; stage "
            f"{self.name!r} cannot be applied to a model at once."
        )

    def check_not_replaced(
        self, model: nn.Module, configured: Iterable[CompressionStage] = ()
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
        recorded = sorted(self._recorded_keys(model) - expected)
        self.check_not_legacy(model)
        if recorded:
            raise PPQConfigError(
                f"stage {self.name!r}: the model already records a stage {self.name!r} as "
                f"{recorded[0]}, but this run configures {self.state_key}; applying it would "
                f"stack a second {self.name!r} stage on the first. Load a dense model (or use "
                "the configuration the model was compressed with), or give the new stage "
                "another `name` to stack it deliberately."
            )

    def _recorded_keys(self, model: nn.Module) -> set[str]:
        """The state keys ``model``'s history records under this stage's name."""
        return {
            entry["stage"]
            for _, _, state in compressed_modules(model)
            for entry in state.history
            if isinstance(entry.get("stage"), str) and recorded_name(entry) == self.name
        }

    def check_not_legacy(self, model: nn.Module) -> None:
        """Refuse a model whose history records a stage of this name under a key of version 1
        (written before a stage's identity covered every argument): whether it is this stage
        cannot be known.

        Raises:
            PPQConfigError: naming the recorded key and what to do.
        """
        legacy = sorted(k for k in self._recorded_keys(model) if is_legacy_key(k))
        if legacy:
            raise PPQConfigError(
                f"stage {self.name!r}: the model records a stage {self.name!r} as {legacy[0]}, "
                "written by an earlier ppq-lightning whose stage identities left out arguments "
                "that change the weights (targets, ignore, damping, calibration settings), so "
                f"whether it is this run's {self.state_key} cannot be known. Nothing was changed; "
                "compress a dense model again with this version."
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
                NaN/Inf weight or cannot be compressed by this stage, this stage is already
                recorded on ``model``, or a stage of this name is recorded under a key of an
                earlier version (:meth:`check_not_legacy`). Stacking stages of one name is
                allowed here (a run's Trainer refuses it: :meth:`check_not_replaced`).
            CompressionError: when the stage produced a non-finite weight (the layers are
                restored).
        """
        self.trainer, self.dataloader, self.calibration = trainer, dataloader, None
        self.check_not_legacy(model)
        if self.state_key in applied_stages(model):
            raise PPQConfigError(
                f"stage {self.name!r} ({self.state_key}) is already applied to this model: its "
                "layers' history records it, and applying it again would compress them twice. "
                "Apply it to a fresh model, or give a deliberate second stage another `name`."
            )
        trace_default_boundary(model, self.targets, trainer, dataloader, self.forward_fn)
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
        store = disk_weights(model)
        if store is not None:
            self.check_streams(store)
        try:
            with restored_on_error(model, modules), torch.inference_mode(False), torch.no_grad():
                if store is None or self.streams_blocks:
                    layers = self.compress(model, modules)
                else:  # weights on disk: one layer resident at a time, written back after it
                    layers = {}
                    for name, module in modules.items():
                        with store.materialized(module):
                            layers.update(self.compress(model, {name: module}))
        finally:
            if store is not None:  # the files of a failed stage, or of older block versions
                store.collect()
            after = {n: find_module(model, n) for n in modules}
            check_finite(after, f"stage {self.name!r} produced", CompressionError)
        seconds = time.perf_counter() - start
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if fitting and any(id(p) not in parameters for p in model.parameters()):
            trainer.strategy.setup_optimizers(trainer)  # new parameters (factors): train them
        return self.conclude(model, index, layers, seconds)

    @property
    def layerwise(self) -> bool:
        """Whether compressing the targets one at a time gives what compressing them together
        does (no decision spans layers): such a stage runs on weights on disk one layer at a
        time. False unless a method says so."""
        return False

    def check_streams(self, store: DiskWeights) -> None:
        """Refuse, before any weight changes, a stage that can run neither block by block
        (``streams_blocks``) nor layer by layer (:attr:`layerwise`) on weights on disk.

        Raises:
            PPQConfigError: naming the stage and what to do.
        """
        if not (self.streams_blocks or self.layerwise):
            raise PPQConfigError(
                f"stage {self.name!r} ({type(self).__name__}) takes every layer at once, so it "
                f"cannot run on weights on disk (the model's weights are mapped from "
                f"{os.fspath(store.folder)}): load the model in memory (no offload_folder), or "
                "configure it layer by layer where it can be (e.g. scope: layer, no promote "
                "or layer_bits)."
            )

    def conclude(
        self, model: nn.Module, index: int, layers: dict[str, dict[str, float]], seconds: float
    ) -> StageResult:
        """Mark the stage applied and build its :class:`StageResult` (``self.result``).

        With ``PPQ_CHECK_INVARIANTS=1`` in the environment (the test suite sets it:
        ``compressed.invariants.CHECK_AFTER_STAGES``) the invariants of the whole model are
        checked first, so a stage that records a state its weights do not have fails there.

        Raises:
            InvariantError: (with ``PPQ_CHECK_INVARIANTS=1``) naming the layer whose weights
                disagree with its recorded mask or grid.
        """
        if checks_after_stages():
            check_invariants(model)
        warn_indistinct_grids(self.name, model, layers)
        summary = compression_summary(model, self.b_orig)
        self.result = StageResult(
            index,
            self.name,
            StageKind(self.kind).value,
            self.stage_config(),
            layers,
            summary,
            seconds,
            calibration=self.calibration_record(),
        )
        self._applied = True
        return self.result

    def calibration_record(self) -> dict[str, Any]:
        """The stage's calibration data for its result: ``calibration_data`` (where the batches
        came from) and ``calibration_batches`` (how many it read: fewer than
        ``num_calibration_batches`` from a shorter dataloader; per rank from a dataloader the
        strategy shards); empty when the stage read none."""
        data = self.calibration
        if data is None:
            return {}
        return {"calibration_data": data.origin, "calibration_batches": data.taken}

    def already_applied(self, model: nn.Module) -> bool:
        """Whether this stage is recorded in ``model`` (a resumed or reloaded run)."""
        return self._applied or self.state_key in applied_stages(model)
