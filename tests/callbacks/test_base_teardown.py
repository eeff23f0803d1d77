"""FiresOnce.teardown: a run asked to compress whose stages never fired is an error."""

import lightning as L
import pytest
from torch.utils.data import DataLoader

from ppq_lightning.callbacks import (
    CompressionSchedule,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
)
from ppq_lightning.compressed.state import applied_stages
from ppq_lightning.datamodules import TextDataModule
from ppq_lightning.errors import PPQConfigError
from tests.bad_inputs.helpers import assert_same_state, model_fingerprint, names
from tests.helpers import make_trainer


def _data(**kwargs):
    return TextDataModule(
        source="pydoc",
        tokenizer="bytes",
        seqlen=64,
        max_eval_windows=2,
        num_calibration_samples=2,
        **kwargs,
    )


class _EmptyValidation(TextDataModule):
    def val_dataloader(self):
        return DataLoader([])


@pytest.mark.parametrize(
    ("fn", "limit"),
    [
        ("validate", "limit_val_batches"),
        ("test", "limit_test_batches"),
        ("predict", "limit_predict_batches"),
    ],
)
def test_a_skipped_evaluation_loop_is_refused(tmp_path, tiny_lm, fn, limit):
    stage = MagnitudePruning(sparsity=0.5, name="P")
    before = model_fingerprint(tiny_lm)
    trainer = make_trainer(tmp_path, [stage], **{limit: 0})
    with pytest.raises(PPQConfigError, match=names("'P' (MagnitudePruning)", f"{limit}=0", fn)):
        getattr(trainer, fn)(tiny_lm, datamodule=_data())
    assert not applied_stages(tiny_lm)
    assert_same_state(before, tiny_lm)
    assert trainer.interrupted  # the loggers were told the run failed


def test_an_empty_validation_dataloader_is_refused(tmp_path, tiny_lm):
    schedule = CompressionSchedule(
        stages=[MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")],
        output_dir=str(tmp_path / "report"),
    )
    data = _EmptyValidation(source="pydoc", tokenizer="bytes", seqlen=64)
    with pytest.raises(
        PPQConfigError,
        match=names("'P' (MagnitudePruning, in CompressionSchedule)", "'Q'", "dataloader is empty"),
    ):
        make_trainer(tmp_path, [schedule]).validate(tiny_lm, datamodule=data, verbose=False)
    assert not (tmp_path / "report").exists()


def test_fit_that_ends_before_at_step_is_refused(tmp_path, tiny_lm):
    stage = MagnitudePruning(sparsity=0.5, name="P", at_step=3)
    trainer = make_trainer(
        tmp_path, [stage], max_epochs=1, max_steps=5, limit_train_batches=2, limit_val_batches=0
    )
    with pytest.raises(
        PPQConfigError, match=names("at_step=3", "global step 2", "max_epochs=1", "`fit`")
    ):
        trainer.fit(tiny_lm, datamodule=_data())
    assert not applied_stages(tiny_lm)


def test_fit_without_training_refuses_the_stages_after_the_training_stage(tmp_path, tiny_lm):
    lora, pruning = LoRAFineTune(r=2, name="L"), MagnitudePruning(sparsity=0.5, name="P")
    trainer = make_trainer(tmp_path, [lora, pruning], max_steps=0, limit_val_batches=0)
    with pytest.raises(PPQConfigError, match=names("'L' (LoRAFineTune)", "'P'", "max_steps=0")):
        trainer.fit(tiny_lm, datamodule=_data())


def test_fit_without_training_fires_the_stages_of_fit_start(tmp_path, tiny_lm):
    stage = MagnitudePruning(sparsity=0.5, name="P")  # fires at fit start: nothing is lost
    make_trainer(tmp_path, [stage], max_steps=0, limit_val_batches=0).fit(
        tiny_lm, datamodule=_data()
    )
    assert stage.state_key in applied_stages(tiny_lm)


def test_an_already_compressed_model_is_not_refused(tmp_path, tiny_lm):
    MagnitudePruning(sparsity=0.5, name="P").apply(tiny_lm)
    again = MagnitudePruning(sparsity=0.5, name="P")  # the same stage, recorded on the model
    make_trainer(tmp_path, [again], limit_val_batches=0).validate(
        tiny_lm, datamodule=_data(), verbose=False
    )


class _Boom(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise RuntimeError("boom in training")


def test_an_interrupted_run_keeps_its_own_exception(tmp_path, tiny_lm):
    stage = MagnitudePruning(sparsity=0.5, name="P", at_step=3)
    trainer = make_trainer(tmp_path, [stage, _Boom()], max_steps=5, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="boom in training"):
        trainer.fit(tiny_lm, datamodule=_data())
    assert not applied_stages(tiny_lm)
