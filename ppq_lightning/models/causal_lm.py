"""A LightningModule for any Hugging Face causal LM, evaluated by perplexity (and, with
``tasks``, by lm-eval-harness task metrics)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from ppq_lightning.calibration.blocks import find_block_chain
from ppq_lightning.calibration.capture import evaluating
from ppq_lightning.calibration.data import batch_input
from ppq_lightning.edits.loading import enable_state_loading, require_state_loading
from ppq_lightning.errors import PPQConfigError, bad_value, check_number
from ppq_lightning.models.lm_tasks import TaskEvaluation
from ppq_lightning.models.loading import OFFLINE_DEFAULT, load_causal_lm
from ppq_lightning.modules.offload import stream_model

_OWN_METRICS = {"ppl": False, "loss": False}


class CausalLMModule(L.LightningModule):
    """Wraps a causal LM; validation and test report perplexity as GPTQ/SparseGPT measure it.

    Perplexity is ``exp`` of the mean next-token negative log-likelihood over all tokens of all
    evaluation windows (non-overlapping windows of ``seqlen``, made by the datamodule), computed
    with ``torchmetrics.text.Perplexity``. Logged keys: ``val/ppl``, ``val/loss``,
    ``test/ppl``, ``test/loss``, ``train/loss``. With ``tasks``, every validation and test
    epoch (and ``evaluate``, so every schedule stage and study cell) also runs those
    lm-eval-harness tasks on the model in memory: ``val/<task>/<metric>`` (e.g.
    ``val/pydoc_cloze/acc``), see ``TaskEvaluation``.

    Args:
        model: ``"smollm2-135m"`` (offline default), a local ``.gguf`` file, a local directory
            or a HF hub id.
        model_config: build a randomly initialised model from this config instead (tests).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        learning_rate: AdamW learning rate for ``fit``.
        seed: seed of the random initialisation with ``model_config``.
        tasks: lm-eval-harness tasks to report next to perplexity (a ``TaskEvaluation`` or
            its arguments as a dict); None: perplexity only.
        offload_folder: keep the weights on disk, memory-mapped (``modules.offload``; a local
            folder's safetensors files are mapped where they are): compression and evaluation
            hold one block at a time, and compressed blocks are written to this folder.

    A compressed checkpoint loads with ``load_from_checkpoint`` (its recorded structural edits
    are replayed and its compression states attached, ``edits.enable_state_loading``); a plain
    ``load_state_dict`` of one refuses it with an error naming ``enable_state_loading``.

    Raises:
        PPQConfigError: on a ``learning_rate`` that is not a number > 0, when the model
            cannot be loaded (see ``load_causal_lm``: bad ``model``, ``model_config``,
            ``dtype`` or ``seed``), or on bad ``tasks`` (see ``TaskEvaluation``).

    Example (YAML)::

        model:
          class_path: ppq_lightning.models.CausalLMModule
          init_args:
            model: smollm2-135m
            tasks: {tasks: [pydoc_cloze], limit: 200}   # optional
    """

    metric_name = "ppl"
    higher_is_better = False
    b_orig = 16  # bits of an original weight (LLMs are evaluated in 16-bit formats)

    def __init__(
        self,
        model: str = OFFLINE_DEFAULT,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        learning_rate: float = 1e-4,
        seed: int = 0,
        tasks: TaskEvaluation | None = None,
        offload_folder: str | None = None,
    ) -> None:
        super().__init__()
        check_number("learning_rate", learning_rate, low=0, low_open=True)
        self.tasks = task_evaluation(tasks)
        self.save_hyperparameters(ignore=["tasks"])  # kept as a plain dict: checkpoints load
        self.hparams["tasks"] = self.tasks.config() if self.tasks is not None else None
        self.model = load_causal_lm(model, model_config, dtype, seed, offload_folder)
        if offload_folder is not None:  # every forward holds one block's pages at a time
            chain = find_block_chain(self.model)
            stream_model(self.model, chain.blocks if chain is not None else ())
        self.learning_rate = learning_rate
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self.tokenizer_name: str | None = model if model_config is None else None
        require_state_loading(self)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        learning_rate: float = 1e-4,
        tasks: TaskEvaluation | dict[str, Any] | None = None,
    ) -> CausalLMModule:
        """Wrap an already-built causal LM (Python API; no hyperparameters are saved).

        ``tasks`` needs its ``tokenizer`` set: a wrapped model has no name to load one by.

        Raises:
            PPQConfigError: when ``model`` is not an ``nn.Module``, ``learning_rate`` not a
                number > 0, or ``tasks`` is bad (see ``TaskEvaluation``).
        """
        if not isinstance(model, nn.Module):
            raise bad_value("model", model, "an nn.Module (a Hugging Face causal LM)")
        check_number("learning_rate", learning_rate, low=0, low_open=True)
        module = cls.__new__(cls)
        L.LightningModule.__init__(module)
        module.model, module.learning_rate = model, learning_rate
        module.val_ppl, module.test_ppl = Perplexity(), Perplexity()
        module.tasks, module.tokenizer_name = task_evaluation(tasks), None
        require_state_loading(module)
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads a checkpoint's state dict: replay its recorded edits and
        attach its compression states (``edits.enable_state_loading``)."""
        enable_state_loading(self)

    def setup(self, stage: str) -> None:
        """Before any loop runs (and any stage changes a weight): check that the datamodule's
        windows and tokenizer fit the model (:func:`check_data_fits`).

        Raises:
            PPQConfigError: naming the datamodule's ``seqlen`` or ``tokenizer``.
        """
        trainer = self._trainer
        check_data_fits(self.model, getattr(trainer, "datamodule", None))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` of token ids ``(B, T)``.

        Raises:
            PPQConfigError: on token ids outside the model's vocabulary, or more tokens than
                its learned position embeddings have positions (:func:`check_token_ids`); the
                embedding's ``IndexError: index out of range in self`` said neither.
        """
        check_token_ids(self.model, input_ids)
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _shifted(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Next-token logits and targets: ``(B, T-1, vocab)`` float32 and ``(B, T-1)``."""
        ids = batch_input(batch)
        return self(ids)[:, :-1].float(), ids[:, 1:]

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Next-token cross-entropy of a batch; logs ``train/loss``."""
        logits, targets = self._shifted(batch)
        loss = self._loss(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=targets.shape[0])
        return loss

    def _eval_step(self, batch: Any, metric: Perplexity, split: str) -> Tensor:
        logits, targets = self._shifted(batch)
        metric.update(logits, targets)
        loss = self._loss(logits, targets)
        size = targets.shape[0]  # windows have equal length: the batch-weighted mean is per token
        self.log(f"{split}/ppl", metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def task_metrics(self) -> dict[str, float]:
        """The ``tasks``' metrics on the model as it is in memory (``{}`` without tasks),
        in eval mode (the previous mode is restored)."""
        if self.tasks is None:
            return {}
        with torch.no_grad(), evaluating(self):
            return self.tasks.evaluate(self.model, self.tokenizer_name)

    def _log_tasks(self, split: str) -> None:
        if self.tasks is not None and not self.trainer.sanity_checking:
            for key, value in self.task_metrics().items():
                self.log(f"{split}/{key}", value, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/<task>/<metric>`` of every task (with ``tasks``)."""
        self._log_tasks("val")

    def on_test_epoch_end(self) -> None:
        """Logs ``test/<task>/<metric>`` of every task (with ``tasks``)."""
        self._log_tasks("test")

    def metric_names(self) -> dict[str, bool]:
        """Every metric ``evaluate`` reports, with whether higher is better."""
        tasks = self.tasks.metric_names() if self.tasks is not None else {}
        return _OWN_METRICS | tasks

    def metric_higher_is_better(self, metric: str) -> bool:
        """Whether a larger ``metric`` is better (False for ``ppl`` and ``loss``; a task
        metric's direction is the one its task declares).

        Raises:
            PPQConfigError: on a metric ``evaluate`` does not report.
        """
        names = self.metric_names()
        if metric not in names:
            raise bad_value("metric", metric, f"one of {', '.join(sorted(names))}")
        return names[metric]

    def evaluation_signature(self) -> str:
        """What ``evaluate`` depends on besides weights and data (the tasks' settings)."""
        return self.tasks.signature() if self.tasks is not None else ""

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Updates ``val/ppl`` and logs ``val/loss``; ``batch`` is a dict or a tensor of ids."""
        return self._eval_step(batch, self.val_ppl, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Updates ``test/ppl`` and logs ``test/loss``, as ``validation_step`` does."""
        return self._eval_step(batch, self.test_ppl, "test")

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable[Any]) -> dict[str, float]:
        """Perplexity and mean token loss over ``dataloader``, outside any Trainer loop, and
        the ``tasks``' metrics (``<task>/<metric>``) when there are tasks.

        Computed exactly as validation computes ``val/ppl``, on the device of the weights, in
        eval mode (the previous mode is restored). ``loss`` is the mean token NLL, ``log(ppl)``.
        """
        parameter = next(self.model.parameters(), None)
        device = self.device if parameter is None else parameter.device
        metric = Perplexity().to(device)
        with torch.no_grad(), evaluating(self):  # every module gets its own mode back
            for batch in dataloader:
                logits, targets = self._shifted(batch_input(batch).to(device))
                metric.update(logits, targets)
        ppl = float(metric.compute())
        return {"ppl": ppl, "loss": math.log(ppl), **self.task_metrics()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the parameters that require gradients. The learnable parameters of a
        training-time quantizer (CoDeQ's dead zones and bit widths: ``.ppq_`` in their name) get
        no weight decay, which would pull them towards wider dead zones and fewer bits."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [  # always two groups, so checkpoints taken before/after such a stage match
            {"params": [p for n, p in named if ".ppq_" not in n]},
            {"params": [p for n, p in named if ".ppq_" in n], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.learning_rate)


def task_evaluation(tasks: Any) -> TaskEvaluation | None:
    """``tasks`` as a ``TaskEvaluation`` (a dict is its arguments; None stays None).

    Raises:
        PPQConfigError: on anything else, or bad arguments (see ``TaskEvaluation``).
    """
    if tasks is None or isinstance(tasks, TaskEvaluation):
        return tasks
    if isinstance(tasks, dict):
        try:
            return TaskEvaluation(**tasks)
        except TypeError as err:
            raise PPQConfigError(f"tasks={tasks!r}: {err}") from err
    raise bad_value("tasks", tasks, "None, a TaskEvaluation or a dict of its arguments")


def vocabulary_size(model: nn.Module) -> int | None:
    """The rows of ``model``'s input embedding (a Hugging Face model's
    ``get_input_embeddings()``), None when it has none to read."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


_LEARNED_POSITIONS: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def learned_positions(model: nn.Module) -> int | None:
    """``max_position_embeddings`` of a model with a learned table of absolute positions
    (GPT-2's ``wpe``, OPT's ``embed_positions``), which has no row for a later position; None
    for models without one (rotary positions, as Llama's, compute any position). Found once
    per model (it walks the modules; ``forward`` asks on every call)."""
    if model not in _LEARNED_POSITIONS:
        _LEARNED_POSITIONS[model] = _find_learned_positions(model)
    return _LEARNED_POSITIONS[model]


def _find_learned_positions(model: nn.Module) -> int | None:
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    get = getattr(model, "get_input_embeddings", None)
    tokens = get() if callable(get) else None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        table = isinstance(module, nn.Embedding) and module is not tokens
        if table and ("pos" in leaf or leaf == "wpe"):
            return positions
    return None


def check_token_ids(model: nn.Module, input_ids: Tensor) -> None:
    """Refuse token ids ``model`` has no embedding for, and sequences longer than its learned
    positions.

    Args:
        model: the causal LM (a Hugging Face model; others are not checked).
        input_ids: ``(B, T)`` token ids.

    Raises:
        PPQConfigError: naming the smallest and largest id and the model's ``vocab_size``, or
            the length and its ``max_position_embeddings``, with the fix.
    """
    vocab = vocabulary_size(model)
    if vocab is not None and input_ids.numel():
        low, high = (int(v) for v in torch.aminmax(input_ids.detach()))
        if low < 0 or high >= vocab:
            raise PPQConfigError(
                f"input_ids hold token ids from {low} to {high}, outside the model's vocabulary "
                f"of {vocab} tokens (ids 0 to {vocab - 1}): the data was tokenised for another "
                "model. Use the model's own tokenizer (TextDataModule's tokenizer), or a model "
                f"with vocab_size > {high}."
            )
    positions = learned_positions(model)
    if positions is not None and input_ids.shape[-1] > positions:
        raise PPQConfigError(
            f"input_ids of {input_ids.shape[-1]} tokens: the model has learned position "
            f"embeddings for max_position_embeddings={positions} positions. Use windows of at "
            f"most {positions} tokens (TextDataModule's seqlen)."
        )


def check_data_fits(model: nn.Module, datamodule: Any) -> None:
    """Refuse a datamodule whose windows (``seqlen``) or tokenizer (``tokenizer_size``, set by
    ``TextDataModule.setup``) do not fit ``model``, before anything runs.

    Args:
        model: the causal LM.
        datamodule: the Trainer's datamodule (None, or one without these attributes, is not
            checked).

    Raises:
        PPQConfigError: naming ``seqlen`` or ``tokenizer``, the value, the model's limit and
            the fix.
    """
    if datamodule is None:
        return
    seqlen, positions = getattr(datamodule, "seqlen", None), learned_positions(model)
    if isinstance(seqlen, int) and positions is not None and seqlen > positions:
        raise bad_value(
            "seqlen",
            seqlen,
            f"at most the model's max_position_embeddings={positions} (its learned position "
            f"embeddings have no row for a later position); use seqlen <= {positions}",
        )
    size, vocab = getattr(datamodule, "tokenizer_size", None), vocabulary_size(model)
    if isinstance(size, int) and vocab is not None and size > vocab:
        raise bad_value(
            "tokenizer",
            getattr(datamodule, "tokenizer_name", None),
            f"a tokenizer of at most the model's {vocab} tokens (vocab_size={vocab}), but it has "
            f"{size}: its ids from {vocab} on have no embedding. Use the model's own tokenizer, "
            f"or a model_config with vocab_size >= {size}",
        )
