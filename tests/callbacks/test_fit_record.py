"""#26 point 4: checkpoints written by ``ModelCheckpoint`` during a fit with a training stage
load and export, and say which stages they hold and which had not fired.

The modules are written the way their authors write them: an HF causal LM built from a tiny
config inside a plain LightningModule, and Lightning's demo ``LightningTransformer``; plain
``lightning.Trainer`` with ``ModelCheckpoint`` (every epoch, last, every n steps weights-only).
"""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    SQS,
    DeadZoneQuantization,
    LoRAFineTune,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
)
from ppq_lightning.compressed.history import FIT_RECORD
from ppq_lightning.compressed.state import applied_stages, compressed_modules, get_state
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.edits.training import MidFitCheckpointWarning
from ppq_lightning.export import export, load_compressed
from ppq_lightning.export.checkpoint import load_lightning_checkpoint, safe_torch_load
from ppq_lightning.modules.targets import resolve_targets
from tests.user_modules.modules import UserCausalLM, token_dicts

VOCAB = 64
PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


class UserLM(L.LightningModule):
    """A Hugging Face causal LM inside a plain LightningModule, as its users write one; the
    one line for compressed checkpoints is ``on_load_checkpoint``."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        enable_state_loading(self)


def tokens() -> DataLoader:
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader(ids, batch_size=2)  # 4 steps an epoch


class Probe(L.Callback):
    """What the training module computes (eval, no grad) when each checkpoint is written, keyed
    by (epoch, step); ``ModelCheckpoint`` runs after every other callback, on the same weights."""

    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.inputs, self.outputs = inputs, {}

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.outputs[(trainer.current_epoch, trainer.global_step)] = pl_module(*self.inputs)
        pl_module.train()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % 3 == 0:  # the weights-only checkpoints every 3 steps
            self._probe(trainer, pl_module)


def fit(tmp_path, module: L.LightningModule, stages: list, data: DataLoader, probe: Probe):
    savers = [
        ModelCheckpoint(
            dirpath=tmp_path / "epochs", every_n_epochs=1, save_top_k=-1, save_last=True
        ),
        ModelCheckpoint(
            dirpath=tmp_path / "steps", every_n_train_steps=3, save_top_k=-1, save_weights_only=True
        ),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[*stages, probe, *savers],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=data)
    return trainer


def saved_at(path) -> tuple[int, int]:
    checkpoint = safe_torch_load(path)
    return checkpoint["epoch"], checkpoint["global_step"]


STAGES = {  # (stages before, the training stage, a stage that fires when training ends)
    "lora-never": lambda: (
        [MagnitudePruning(sparsity=0.5, name="P")],
        LoRAFineTune(r=2, alpha=4, merge="never"),
        RTNQuantization(bits=4, name="Q"),
    ),
    "lora-at_end": lambda: (
        [MagnitudePruning(sparsity=0.5, name="P")],
        LoRAFineTune(r=2, alpha=4, merge="at_end"),
        RTNQuantization(bits=4, name="Q"),
    ),
    "qat": lambda: (
        [MagnitudePruning(sparsity=0.5, name="P")],
        QuantizationAwareTraining(bits=4),
        MagnitudePruning(sparsity=0.7, name="P2"),
    ),
    "codeq": lambda: (
        [],
        DeadZoneQuantization(bits=4, init_dead_zone=0.2, sparsity_weight=1.0),
        RTNQuantization(bits=8, name="Q"),
    ),
    "sqs": lambda: (
        [MagnitudePruning(sparsity=0.5, name="P")],
        SQS(bits=4, anneal_steps=8, prior_inclusion=0.3, kl_weight=5.0),
        RTNQuantization(bits=8, name="Q"),
    ),
}


@pytest.mark.parametrize("case", sorted(STAGES))
def test_every_checkpoint_of_the_fit_loads_as_it_computed_says_what_it_holds_and_exports(
    tmp_path, case
):
    before, training, after = STAGES[case]()
    torch.manual_seed(0)
    module, probe = UserLM(), Probe((PROBE,))
    trainer = fit(tmp_path, module, [*before, training, after], tokens(), probe)
    paths = sorted((tmp_path / "epochs").glob("*.ckpt")) + sorted((tmp_path / "steps").glob("*"))
    assert len(paths) == 5  # epoch=0, epoch=1, last; weights-only at steps 3 and 6
    for path in paths:
        epoch, step = saved_at(path)
        held = ", ".join(f"{type(s).__name__} {s.name!r}" for s in before)
        with pytest.warns(MidFitCheckpointWarning) as caught:
            loaded = UserLM.load_from_checkpoint(path).eval()
        message = str(caught[0].message)
        assert f"taken during fit at epoch {epoch}, step {step}" in message
        assert f"before {type(after).__name__} {after.name!r} fired" in message
        assert f"it holds {held + ', ' if held else ''}{type(training).__name__} " in message
        assert f"(training, epoch {epoch}, step {step})" in message
        # the model the fit computed when it wrote the checkpoint, bit for bit
        with torch.no_grad():
            assert torch.equal(loaded(PROBE), probe.outputs[(epoch, step)]), path.name
        stages = applied_stages(loaded)
        assert training.state_key in stages and after.state_key not in stages
        assert all(s.state_key in stages for s in before)
        entries = [
            e
            for _, _, state in compressed_modules(loaded)
            for e in state.history
            if e["stage"] == training.state_key
        ]
        assert entries and all(e["mid_fit"] == {"epoch": epoch, "step": step} for e in entries)
        check_invariants(loaded)
        # the framework's loader reads it too (weights_only), and it exports and reloads
        with pytest.warns(MidFitCheckpointWarning):
            rebuilt = load_lightning_checkpoint(path, UserLM)
        with torch.no_grad():
            assert torch.equal(rebuilt(PROBE), probe.outputs[(epoch, step)])
        out = tmp_path / "export" / path.stem
        manifest = export(rebuilt, "ppq", out)
        assert manifest["measured_C"] > 1
        with torch.no_grad():
            assert torch.equal(load_compressed(out, model=UserLM())(PROBE), rebuilt(PROBE))

    # after fit: the stage finished and the later one fired; nothing to say
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert FIT_RECORD not in safe_torch_load(tmp_path / "after.ckpt")["state_dict"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MidFitCheckpointWarning)
        final = UserLM.load_from_checkpoint(tmp_path / "after.ckpt").eval()
    assert after.state_key in applied_stages(final)
    with torch.no_grad():
        assert torch.equal(final(PROBE), module.eval()(PROBE))


@pytest.fixture
def no_encoder_fast_path():
    """``nn.TransformerEncoderLayer``'s eval fast path reads ``linear1.weight`` itself and so
    skips peft's adapters (and weight transforms) unless a forward hook disables it: a
    fused-projection matter, not this test's; both sides here compute the module's own way."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.mark.parametrize("how", ["loaded, then validated", "validate(ckpt_path=...)"])
def test_the_pending_stages_run_on_a_mid_fit_checkpoint_with_the_fits_callbacks(tmp_path, how):
    """What the warning advises: the stages held are recognised (not applied twice), the
    pending one fires."""
    before, training, after = STAGES["lora-never"]()
    torch.manual_seed(0)
    fit(tmp_path, UserLM(), [*before, training, after], tokens(), Probe((PROBE,)))
    ckpt = tmp_path / "epochs" / "epoch=0-step=4.ckpt"
    before, training, after = STAGES["lora-never"]()
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[*before, training, after],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(MidFitCheckpointWarning):
        if how == "validate(ckpt_path=...)":
            model = UserLM()
            trainer.validate(model, tokens(), ckpt_path=ckpt, verbose=False)
        else:
            model = UserLM.load_from_checkpoint(ckpt)
            trainer.validate(model, tokens(), verbose=False)
    assert before[0].result is None and training.result is None and after.result is not None
    stages = applied_stages(model)
    assert {before[0].state_key, training.state_key, after.state_key} <= stages
    assert check_invariants(model)


def test_lightning_demo_transformer_with_lora(tmp_path, no_encoder_fast_path):
    """Lightning's demo LightningTransformer (nn.Transformer, no saved hyperparameters), LoRA on
    its feed-forward layers: its checkpoints load through the framework's loader."""
    torch.manual_seed(0)
    module = LightningTransformer(vocab_size=33)
    module.prepare_data = lambda: None  # it downloads WikiText2; this test brings its batches
    ids = torch.randint(0, 33, (8, 12), generator=torch.Generator().manual_seed(0))
    data = DataLoader(list(zip(ids, ids.roll(-1, dims=1), strict=True)), batch_size=2)
    inputs = (ids[:2], ids[:2].roll(-1, dims=1))
    probe = Probe(inputs)
    pruning = MagnitudePruning(sparsity=0.5, targets=r"linear[12]", name="P")  # the bases
    lora = LoRAFineTune(r=2, alpha=4, target_modules=r"linear[12]$", merge="at_end")
    rtn = RTNQuantization(bits=4, targets=r"linear[12]", name="Q")
    fit(tmp_path, module, [pruning, lora, rtn], data, probe)
    for path in sorted((tmp_path / "epochs").glob("*.ckpt")):
        epoch, step = saved_at(path)
        with pytest.warns(MidFitCheckpointWarning, match="before RTNQuantization 'Q' fired"):
            loaded = load_lightning_checkpoint(path, LightningTransformer, vocab_size=33)
        with torch.no_grad():
            assert torch.equal(loaded(*inputs), probe.outputs[(epoch, step)])
        assert lora.state_key in applied_stages(loaded) and check_invariants(loaded)
        assert export(loaded, "ppq", tmp_path / path.stem)["measured_C"] > 1
        reloaded = load_compressed(tmp_path / path.stem, model=LightningTransformer(vocab_size=33))
        with torch.no_grad():
            assert torch.equal(reloaded(*inputs), loaded(*inputs))


def test_a_module_without_state_loading_is_told_what_to_do(tmp_path):
    """A plain ``load_state_dict`` of a fresh model refuses the fit record by name (torch would
    only list unexpected keys) once the model asks for it (``require_state_loading``)."""
    from ppq_lightning.edits.loading import require_state_loading
    from ppq_lightning.errors import PPQConfigError

    torch.manual_seed(0)
    module = UserLM()
    fit(tmp_path, module, [QuantizationAwareTraining(bits=4)], tokens(), Probe((PROBE,)))
    saved = safe_torch_load(tmp_path / "epochs" / "last.ckpt")["state_dict"]
    assert FIT_RECORD in saved and not any("ppq_state" in k for k in saved)  # QAT on dense
    fresh = UserLM()
    require_state_loading(fresh)
    with pytest.raises(PPQConfigError, match=r"a fit record .*enable_state_loading"):
        fresh.load_state_dict(saved)


class Failing(UserLM):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step == 1:
            raise RuntimeError("the user's step failed")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("stage", [LoRAFineTune, QuantizationAwareTraining])
@pytest.mark.parametrize("how", ["max_steps=0", "an exception"])
def test_a_fit_that_ends_before_the_stage_finished_leaves_no_record_behind(tmp_path, stage, how):
    """The record describes a stage that trains; once the fit is over without it finishing, a
    state dict of the module must not claim one still does."""
    from ppq_lightning.errors import PPQConfigError

    module = (UserLM if how == "max_steps=0" else Failing)()
    training = stage(r=2) if stage is LoRAFineTune else stage(bits=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=0 if how == "max_steps=0" else 4,
        callbacks=[training],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    error = (PPQConfigError, "max_steps=0") if how == "max_steps=0" else (RuntimeError, "failed")
    with pytest.raises(error[0], match=error[1]):
        trainer.fit(module, tokens())
    assert FIT_RECORD not in module.state_dict()


# -- a fit without a training stage: a stage at a later step, a gradual ramp ----------------
# ``tests/user_modules``' HF Llama module as its user wrote it (batches are the tokenizer's
# dicts), a plain Trainer and a ModelCheckpoint after every optimizer step.

IDS = {"input_ids": PROBE, "attention_mask": torch.ones_like(PROBE)}


class StateLoadingLM(UserCausalLM):
    """The user's module with the one line that lets compressed checkpoints load."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        enable_state_loading(self)


class StepProbe(L.Callback):
    """The module's logits after every optimizer step (when ModelCheckpoint writes a file)."""

    def __init__(self) -> None:
        self.outputs: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.outputs[trainer.global_step] = pl_module(**IDS).logits
        pl_module.train()


def fit_every_step(tmp_path, stage, max_steps: int = 7) -> tuple[L.LightningModule, StepProbe]:
    module, probe = UserCausalLM(), StepProbe()
    saver = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[stage, probe, saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=token_dicts())  # 4 steps an epoch
    return module, probe


def step_checkpoints(tmp_path) -> dict[int, object]:
    return {saved_at(p)[1]: p for p in (tmp_path / "steps").glob("*.ckpt")}


def load_both_ways(path, expect_warning: bool):
    """``load_from_checkpoint`` of the user's class (with the one line) and the framework's
    loader of the class as written; both warn, or neither does."""
    loaded = []
    for load in (
        lambda: StateLoadingLM.load_from_checkpoint(path),
        lambda: load_lightning_checkpoint(path, UserCausalLM),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded.append(load().eval())
        said = [str(w.message) for w in caught if w.category is MidFitCheckpointWarning]
        assert len(said) == (1 if expect_warning else 0), said
    return loaded, said


def test_checkpoints_before_an_at_step_stage_fired_say_so(tmp_path):
    pruning = MagnitudePruning(sparsity=0.5, at_step=2, name="P")
    module, probe = fit_every_step(tmp_path, pruning, max_steps=5)
    paths = step_checkpoints(tmp_path)
    assert sorted(paths) == [1, 2, 3, 4, 5]
    for step, path in sorted(paths.items()):
        record = safe_torch_load(path)["state_dict"].get(FIT_RECORD)
        fired = step > 2  # it fires before the batch at step 2; the file of step 2 is before
        assert (record is None) == fired, step
        if not fired:
            assert "training" not in record and record["step"] == step
            assert [(s["name"], s["status"]) for s in record["stages"]] == [("P", "pending")]
        models, said = load_both_ways(path, expect_warning=not fired)
        for model in models:
            with torch.no_grad():  # the model the fit computed then, bit for bit
                assert torch.equal(model(**IDS).logits, probe.outputs[step]), step
            assert (pruning.state_key in applied_stages(model)) == fired
            check_invariants(model)
        if not fired:
            assert said[0].startswith(
                f"this checkpoint was taken during fit at epoch 0, step {step}"
            )
            assert "before MagnitudePruning 'P' fired; it holds no compression stage" in said[0]
    assert FIT_RECORD not in module.state_dict()  # every stage fired: nothing to say


def ramp_sparsity_of(model: nn.Module, stage: MagnitudePruning) -> float:
    layers = resolve_targets(model, stage.targets, stage.ignore).values()
    zeros = sum(int((~get_state(m).mask).sum()) for m in layers)
    return zeros / sum(m.weight.numel() for m in layers)


RAMP = {"start_step": 1, "end_step": 5, "every": 2}  # masks before the batches of steps 1, 3


def test_checkpoints_along_a_ramp_say_how_far_it_got_and_load_its_masks(tmp_path):
    pruning = MagnitudePruning(sparsity=0.5, ramp=RAMP, name="P")
    module, probe = fit_every_step(tmp_path, pruning)
    paths = step_checkpoints(tmp_path)
    assert sorted(paths) == [1, 2, 3, 4, 5, 6, 7]
    for step, path in sorted(paths.items()):
        record = safe_torch_load(path)["state_dict"].get(FIT_RECORD)
        assert (record is None) == (step > 5), step  # recorded before the batch of step 5
        if record is None:
            models, _ = load_both_ways(path, expect_warning=False)
            assert all(pruning.state_key in applied_stages(m) for m in models)
            continue
        (listed,) = record["stages"]
        ramp = listed["ramp"]
        assert (ramp["start_step"], ramp["end_step"], ramp["target"]) == (1, 5, 0.5)
        assert listed["status"] == ("pending" if step == 1 else "ramping")
        assert ramp["masks_recorded"] == (step > 1)
        models, said = load_both_ways(path, expect_warning=True)
        for model in models:
            with torch.no_grad():
                assert torch.equal(model(**IDS).logits, probe.outputs[step]), step
            assert pruning.state_key not in applied_stages(model)  # not its sparsity yet
            check_invariants(model)
        if step == 1:
            assert ramp["sparsity"] is None
            assert "before MagnitudePruning 'P' fired" in said[0]
            continue
        # the masks it had recorded load with the weights, and the record measured them
        expected = pruning.ramp_sparsity(3 if step > 3 else 1)
        assert ramp["sparsity"] == pytest.approx(expected, abs=0.01)
        assert ramp_sparsity_of(models[0], pruning) == ramp["sparsity"]
        assert (
            "while MagnitudePruning 'P' ramped; it holds MagnitudePruning 'P' mid-ramp" in said[0]
        )
        assert f"sparsity {ramp['sparsity']:.3f} so far, 0.5 when it ends at step 5" in said[0]
    assert FIT_RECORD not in module.state_dict()


def test_the_ramp_runs_to_its_sparsity_on_a_mid_ramp_checkpoint_keeping_its_zeros(tmp_path):
    """What the warning advises: the fit's stages on the loaded model prune it to the ramp's
    sparsity at once; the zeros the ramp had made stay zero (masks only grow)."""
    fit_every_step(tmp_path, MagnitudePruning(sparsity=0.5, ramp=RAMP, name="P"))
    with pytest.warns(MidFitCheckpointWarning, match="mid-ramp"):
        model = load_lightning_checkpoint(step_checkpoints(tmp_path)[4], UserCausalLM)
    pruning = MagnitudePruning(sparsity=0.5, ramp=RAMP, name="P")
    layers = resolve_targets(model, pruning.targets, pruning.ignore)
    before = {name: get_state(m).mask.clone() for name, m in layers.items()}
    L.Trainer(
        accelerator="cpu", callbacks=[pruning], logger=False, enable_progress_bar=False
    ).validate(model, token_dicts(), verbose=False)
    assert pruning.state_key in applied_stages(model) and check_invariants(model)
    assert ramp_sparsity_of(model, pruning) == pytest.approx(0.5, abs=0.01)
    for name, layer in layers.items():
        assert not (get_state(layer).mask & ~before[name]).any(), name


@pytest.mark.parametrize(
    ("stage", "step"),
    [
        (lambda: MagnitudePruning(sparsity=0.5, at_step=2, name="P"), 1),
        (lambda: MagnitudePruning(sparsity=0.5, ramp=RAMP, name="P"), 3),
    ],
)
def test_a_fit_resumed_from_a_mid_fit_checkpoint_loads_it_silently(tmp_path, stage, step):
    fit_every_step(tmp_path / "first", stage())
    path = step_checkpoints(tmp_path / "first")[step]
    resumed, module = stage(), UserCausalLM()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=7,
        callbacks=[resumed],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", MidFitCheckpointWarning)
        trainer.fit(module, train_dataloaders=token_dicts(), ckpt_path=path)
    assert resumed.state_key in applied_stages(module) and check_invariants(module)
    assert FIT_RECORD not in module.state_dict()


def test_a_failed_fit_leaves_no_record_behind_a_stage_that_never_fired(tmp_path):
    class FailingLM(UserCausalLM):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1:
                raise RuntimeError("the user's step failed")
            return super().training_step(batch, batch_idx)

    module = FailingLM()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        callbacks=[MagnitudePruning(sparsity=0.5, at_step=3)],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="failed"):
        trainer.fit(module, token_dicts())
    assert FIT_RECORD not in module.state_dict()
