"""The Lightning adapter of every compression method: a Callback that fires once.

A :class:`CompressionCallback` is a :class:`~ppq_lightning.callbacks.stage.CompressionStage`
(its config, identity, and ``apply`` with rollback) that Lightning drives: it compresses the
modules chosen by ``targets``/``ignore`` once, before the first evaluation of
``validate``/``test``/``predict`` or at a moment of ``fit`` (:class:`FitMoment`), and logs what
it did. In ``Trainer(callbacks=[...])`` the list order is the compression order. The stage is
recorded on every module it touched (``ppq_lightning.compressed``), so a run resumed from a
checkpoint of an already-compressed model never applies it twice. While ``fit`` trains, the
Trainer's first compression callback keeps every layer on its mask and grid
(:class:`FiresOnce`: the one place of that upkeep), and makes every state dict of the module
taken while a stage of the fit is unfinished carry the fit record (``callbacks.fit_record``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ppq_lightning.callbacks.fit_moment import FitMoment, training_was_over
from ppq_lightning.callbacks.fit_record import FitRecorder
from ppq_lightning.callbacks.never_fired import never_fired_error
from ppq_lightning.callbacks.stage import CompressionStage, StageResult
from ppq_lightning.compressed.history import RampProgress
from ppq_lightning.compressed.upkeep import mask_gradients, project_onto_state
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import PPQConfigError, bad_value, check_int


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


class FiresOnce(L.Callback):
    """A callback that runs :meth:`_fire` once, at the first of fit/validate/test/predict.

    In ``fit`` it fires at ``on_fit_start`` (subclasses may choose a later moment); the
    validation loops inside ``fit`` never fire it. While ``fit`` trains, the first such callback
    of the Trainer keeps every compressed layer on its mask and grid
    (``ppq_lightning.compressed.upkeep``): pruned gradients are zeroed before each optimizer
    step and trainable compressed weights are projected back after it; and from ``setup``
    until the fit ends, every state dict of the module taken while a stage of the Trainer is
    not applied carries the fit record (``callbacks.fit_record``: which stages it holds, which
    had not fired, a ramp's progress), so a checkpoint written before a later stage fired says
    so.
    """

    def __init__(self) -> None:
        self._applied = False
        self._fit_record_of_fit = FitRecorder()

    def _fire(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def compression_stages(self) -> list[CompressionCallback]:
        """The compression stages this callback applies (a stage: itself; a schedule: its
        stages), for the checks of :func:`check_trainer_stages`."""
        return []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        enable_state_loading(pl_module)  # before Lightning restores a checkpoint into it
        if stage == TrainerFn.FITTING and self._keeps_invariants(trainer):
            self._fit_record_of_fit.attach(trainer, pl_module)  # before the restore: a resume

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._fit_record_of_fit.detach()

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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Finish what ``on_train_end`` does (a training stage's end, a stage that fires when
        training ends) in a fit resumed from a checkpoint written at its last step: Lightning
        finds ``max_steps``/``max_epochs`` reached and skips the training loop with its
        ``on_train_end`` (:func:`training_was_over`); the resumed run then ends as the
        interrupted one was about to. ``on_train_end`` skips what is already done."""
        if training_was_over(trainer):
            self.on_train_end(trainer, pl_module)

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
        self._fit_record_of_fit.detach()
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


class CompressionCallback(CompressionStage, FiresOnce):
    """Base class of every compression method: a :class:`CompressionStage` Lightning drives.

    Subclasses set ``default_name``, ``kind`` and ``config_class`` (the frozen config of every
    argument that can change the weights; the stage's :attr:`identity` follows from it) and
    define :meth:`compress` (the work on the chosen modules). A stage has one name,
    :attr:`name` (the ``name`` argument, else ``default_name``), used in orders, logs and
    reports, and one key in a run, :attr:`state_key` (the identity, ``@name`` when named).

    Args:
        targets: regex or list of regexes of module names to compress (``re.search``); default
            every ``nn.Linear``/``nn.Conv1d/2d/3d`` except embeddings and the LM head.
        ignore: regexes of module names to leave uncompressed.
        name: a name for this stage, used in orders, metric keys and its ``state_key``; needed
            when two stages of the same class and arguments are in one run.
        b_orig: bits of an original weight, for compression rates (16 for LLMs, 32 for fp32
            vision models).
        log_layers: also log one metric per layer.
        at_epoch: in ``fit``, fire at the start of this (0-based) training epoch instead of at
            fit start; ignored by ``validate``/``test``/``predict``.
        at_step: in ``fit``, fire before the training batch at this global step.
        forward_fn: how the stage calls the model on a calibration batch,
            ``forward_fn(model, batch)``; None for the default forward, which maps tensors,
            dicts and ``(inputs..., labels)`` tuples onto the model's forward signature (see
            ``docs/user_modules.md``).

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
        FiresOnce.__init__(self)
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
        CompressionStage.__init__(
            self,
            targets=targets,
            ignore=ignore,
            name=name,
            b_orig=b_orig,
            log_layers=log_layers,
            **arguments,
        )

    def compression_stages(self) -> list[CompressionCallback]:
        return [self]

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

    def ramp_progress(self, model: nn.Module, step: int) -> RampProgress | None:
        """How far this stage's ramp had got on ``model`` at optimizer step ``step`` (for the
        fit record); None: the stage does not ramp (gradual stages define it)."""
        return None

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
