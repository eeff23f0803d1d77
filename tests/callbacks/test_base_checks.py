"""The checks of ``callbacks/base.py`` at ``setup`` and when a stage fires: stages that cannot
run together, and a changed stage on a resumed or reloaded model."""

import pytest
import torch

from ppq_lightning.callbacks import (
    CompressionSchedule,
    LoRAFineTune,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
)
from ppq_lightning.callbacks.base import check_trainer_stages
from ppq_lightning.callbacks.stage import recorded_name
from ppq_lightning.compressed.state import compressed_modules, get_state
from ppq_lightning.edits.lora import lora_layers
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.bad_inputs.helpers import assert_refused, names
from tests.helpers import TINY_LLAMA, make_trainer, token_batches


def _windows():
    return torch.utils.data.DataLoader(token_batches(2), batch_size=None)


def test_log_layers_must_be_a_bool():
    with pytest.raises(PPQConfigError, match="log_layers='no' is not allowed"):
        RTNQuantization(bits=4, log_layers="no")


@pytest.mark.parametrize("in_schedule", [False, True])
def test_two_training_stages_in_one_trainer_are_refused_at_setup(tmp_path, tiny_lm, in_schedule):
    lora = LoRAFineTune(r=2)
    first = CompressionSchedule([lora], evaluate_each_stage=False) if in_schedule else lora
    trainer = make_trainer(tmp_path, [first, QuantizationAwareTraining(bits=4)], max_steps=1)
    assert_refused(
        lambda: trainer.fit(tiny_lm, train_dataloaders=_windows()),
        PPQConfigError,
        names("stages train more than once", "'lora' (LoRAFineTune)", "'qat'"),
        model=tiny_lm,
    )
    assert not lora_layers(tiny_lm)  # refused before LoRA injected anything


def test_identical_stages_added_after_the_trainer_was_built(tmp_path, tiny_lm, tiny_data):
    trainer = make_trainer(tmp_path, [RTNQuantization(bits=4)])
    trainer.callbacks.append(RTNQuantization(bits=4))  # Lightning checks only at Trainer()
    assert_refused(
        lambda: trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False),
        PPQConfigError,
        names("two stages 'rtn' (RTNQuantization)", "state_key", "set `name=`", "name='rtn1'"),
        model=tiny_lm,
    )


def test_a_schedule_stage_repeated_as_a_plain_callback(tmp_path, tiny_lm, tiny_data):
    schedule = CompressionSchedule([MagnitudePruning(0.5, name="P")], evaluate_each_stage=False)
    trainer = make_trainer(tmp_path, [schedule, MagnitudePruning(0.5, name="P")])
    with pytest.raises(PPQConfigError, match=r"two stages 'P' \(MagnitudePruning\).*`name=`"):
        trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False)
    stage = RTNQuantization(bits=4, name="Q")
    with pytest.raises(PPQConfigError, match="stage 'Q' \\(RTNQuantization\\) is given twice"):
        check_trainer_stages([CompressionSchedule([stage]), stage])


def test_one_name_twice_in_one_run_is_not_a_resume(tmp_path, tiny_lm, tiny_data):
    first, second = MagnitudePruning(0.3), MagnitudePruning(0.5)  # both named "magnitude"
    make_trainer(tmp_path, [first, second]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    layer = tiny_lm.model.model.layers[0].mlp.up_proj
    assert get_state(layer).stages == [first.state_key, second.state_key]


def _q_model(tmp_path, tiny_data) -> CausalLMModule:
    model = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [MagnitudePruning(0.5, name="P"), RTNQuantization(bits=4, name="Q")]
    make_trainer(tmp_path, stages).validate(model, datamodule=tiny_data, verbose=False)
    return model


def test_a_changed_stage_on_a_reloaded_model_is_refused(tmp_path, tiny_data):
    model = _q_model(tmp_path, tiny_data)
    changed = [MagnitudePruning(0.5, name="P"), RTNQuantization(bits=3, name="Q")]
    info = assert_refused(
        lambda: make_trainer(tmp_path, changed).validate(model, datamodule=tiny_data),
        PPQConfigError,
        names("stage 'Q'", "already records", "'bits': 4", "configures", "'bits': 3"),
        model=model,
    )
    assert "Load a dense model" in str(info.value) and "another `name`" in str(info.value)
    # a new name stacks the stage deliberately
    stacked = RTNQuantization(bits=3, name="Q2")
    make_trainer(tmp_path, [stacked]).validate(model, datamodule=tiny_data, verbose=False)
    history = get_state(model.model.model.layers[0].mlp.up_proj).history
    assert [entry["name"] for entry in history] == ["P", "Q", "Q2"]


def test_a_changed_stage_on_a_resumed_checkpoint_is_refused(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, [RTNQuantization(bits=4, name="Q")])
    trainer.validate(CausalLMModule(model_config=TINY_LLAMA, seed=0), datamodule=tiny_data)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    with pytest.raises(PPQConfigError, match=names("'bits': 4", "'bits': 3", "another `name`")):
        make_trainer(tmp_path, [RTNQuantization(bits=3, name="Q")]).validate(
            fresh, datamodule=tiny_data, ckpt_path=tmp_path / "q.ckpt", verbose=False
        )
    histories = [state.history for _, _, state in compressed_modules(fresh)]
    assert histories and all([e["name"] for e in h] == ["Q"] for h in histories)  # no Q, Q


def test_records_without_a_name_are_recognised_by_their_keys():
    named = RTNQuantization(bits=4, name="Q").history_entry()
    unnamed = MagnitudePruning(0.5).history_entry()
    assert (named["name"], unnamed["name"]) == ("Q", "magnitude")
    old = [{k: v for k, v in e.items() if k != "name"} for e in (named, unnamed)]
    assert [recorded_name(e) for e in old] == ["Q", "magnitude"]
    assert recorded_name({"stage": "P", "method": "M", "kind": "P"}) is None


def test_a_changed_later_stage_is_refused_before_an_earlier_one_sets_up(tmp_path, tiny_data):
    model = _q_model(tmp_path, tiny_data)
    stages = [LoRAFineTune(r=2), MagnitudePruning(0.5, name="P"), RTNQuantization(3, name="Q")]
    assert_refused(
        lambda: make_trainer(tmp_path, stages, max_steps=1).fit(model, _windows()),
        PPQConfigError,
        names("stage 'Q'", "'bits': 3"),
        model=model,
    )
    assert not lora_layers(model)  # the LoRA stage listed first injected nothing


def test_a_bad_argument_names_the_stage_it_belongs_to():
    """In a schedule or a YAML of several quantizers, the error says which stage it is."""
    from ppq_lightning.callbacks import GPTQ, RTNQuantization

    with pytest.raises(PPQConfigError, match=r"^RTNQuantization 'Q2': bits=8 is not allowed"):
        RTNQuantization(format="nvfp4", bits=8, name="Q2")
    with pytest.raises(PPQConfigError, match=r"^GPTQ: damp=-1"):
        GPTQ(bits=4, damp=-1)
