"""The catalogue, part stages, schedules and models: each case is refused with a message naming
the argument and the value, and (for the refusals at run time, ``stage.apply(model)``) before
any weight of the model changes."""

import pytest
import torch

from ppq_lightning.callbacks import (
    GPTQ,
    BasisSharing,
    ChannelPruning,
    CompressionSchedule,
    DeadZoneQuantization,
    DepGraphPruning,
    LoRAFineTune,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.callbacks.base import check_trainer_stages
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule, ImageClassifierModule
from ppq_lightning.models.loading import load_causal_lm
from tests.bad_inputs.helpers import assert_refused, names
from tests.helpers import TINY_FAMILIES, TINY_LLAMA, tiny_causal_lm, token_batches

LLAMA = TINY_FAMILIES["llama"][0]  # width 32, MLP 64


def _pq():
    return [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")]


# -- constructors: refused before anything exists -------------------------------------------
CONSTRUCTED = [
    (lambda: MagnitudePruning(sparsity=1.0), names("sparsity=1.0", "[0, 1)")),
    (lambda: MagnitudePruning(sparsity="half"), "sparsity='half'"),
    (lambda: MagnitudePruning(sparsity=0.5, scope="block"), names("scope='block'", "global")),
    (lambda: MagnitudePruning(pattern="4:2"), "pattern='4:2'"),
    (lambda: MagnitudePruning(sparsity=0.5, at_epoch=-1), names("at_epoch=-1", ">= 0")),
    (lambda: RTNQuantization(bits=1), names("bits=1", "2 to 8")),
    (lambda: RTNQuantization(bits=4, group_size=0), "group_size=0"),
    (lambda: RTNQuantization(bits=4, symmetric="false"), names("symmetric='false'", "true or")),
    (lambda: RTNQuantization(bits=4, name=""), "name=''"),
    (lambda: RTNQuantization(bits=4, targets="("), names("targets='('", "regular expression")),
    (lambda: RTNQuantization(bits=4, b_orig=12), names("b_orig=12", "8, 16, 32")),
    (lambda: RTNQuantization(bits=4, log_layers="yes"), "log_layers='yes'"),
    (lambda: GPTQ(bits=4, act_order="yes"), names("act_order='yes'", "true or false")),
    (lambda: GPTQ(bits=4, damp=-1), "damp=-1"),
    (lambda: GPTQ(bits=4, device="bogus"), names("device='bogus'", "torch device")),
    (lambda: SparseGPT(sparsity=0.5, device="cuda:x"), "device='cuda:x'"),
    (lambda: SparseGPT(sparsity=0.5, bits=4, symmetric=1), "symmetric=1"),
    (lambda: Wanda(sparsity=0.5, calibrate_on="dense"), "calibrate_on='dense'"),
    (lambda: BasisSharing(group_size=1, ratio=0.5), names("group_size=1", ">= 2")),
    (lambda: BasisSharing(group_size=2, ratio=0.5, device="gpu"), "device='gpu'"),
    (lambda: ChannelPruning(ratio=0.3, device=0), "device=0"),
    (lambda: LoRAFineTune(r=0), names("r=0", ">= 1")),
    (lambda: LoRAFineTune(reproject="no"), names("reproject='no'", "true or false")),
    (lambda: QuantizationAwareTraining(bits=4, symmetric="false"), "symmetric='false'"),
    (lambda: DeadZoneQuantization(learn_bits="yes"), "learn_bits='yes'"),
    (lambda: DepGraphPruning(ratio=0.3, prune_heads="yes"), "prune_heads='yes'"),
    # schedules
    (lambda: CompressionSchedule(stages=[]), names("stages=[]", "non-empty list")),
    (
        lambda: CompressionSchedule(
            [MagnitudePruning(0.5, name="P"), RTNQuantization(4, name="P")]
        ),
        names("two stages 'P'", "MagnitudePruning", "RTNQuantization", "distinct `name`"),
    ),
    (
        lambda: CompressionSchedule([MagnitudePruning(0.3), MagnitudePruning(0.5)]),
        names("two stages 'magnitude'", "'sparsity': 0.3", "'sparsity': 0.5"),
    ),
    (
        lambda: CompressionSchedule(_pq(), evaluate_each_stage="yes"),
        "evaluate_each_stage='yes'",
    ),
    (lambda: CompressionSchedule(_pq(), log_layers=1), "log_layers=1"),
    (lambda: CompressionSchedule(_pq(), order="P>X"), names("order='P>X'", "'X'")),
    (
        lambda: CompressionSchedule([LoRAFineTune(name="L"), QuantizationAwareTraining(4)]),
        names("train more than once", "L", "qat"),
    ),
    # one Trainer's stages together
    (
        lambda: check_trainer_stages([QuantizationAwareTraining(4), LoRAFineTune()]),
        names("train more than once", "'qat' (QuantizationAwareTraining)", "'lora'"),
    ),
    (
        lambda: check_trainer_stages([CompressionSchedule(_pq()), RTNQuantization(4, name="Q")]),
        names("two stages 'Q' (RTNQuantization)", "set `name=`"),
    ),
    # models
    (lambda: CausalLMModule(model_config=TINY_LLAMA, seed="x"), names("seed='x'", "integer")),
    (lambda: CausalLMModule(model_config=TINY_LLAMA, dtype="int8"), "dtype='int8'"),
    (lambda: CausalLMModule(model_config="llama"), names("model_config='llama'", "dict")),
    (lambda: CausalLMModule(model_config=TINY_LLAMA, learning_rate=0), "learning_rate=0"),
    (lambda: load_causal_lm(7), names("model=7", "non-empty string")),
    (lambda: ImageClassifierModule(num_classes="10"), "num_classes='10'"),
    (lambda: ImageClassifierModule(optimizer="adam"), names("optimizer='adam'", "sgd, adamw")),
    (lambda: ImageClassifierModule(pretrained="yes"), "pretrained='yes'"),
    (lambda: ImageClassifierModule(max_epochs_hint=0), "max_epochs_hint=0"),
]


@pytest.mark.parametrize(("call", "match"), CONSTRUCTED, ids=range(len(CONSTRUCTED)))
def test_refused_when_constructed(call, match):
    assert_refused(call, PPQConfigError, match)


# -- at run time: refused before any weight changes ------------------------------------------
@pytest.fixture
def model():
    return tiny_causal_lm(LLAMA, 1)


def _batches():
    return [batch[:, :8] for batch in token_batches(2)]


RUN_TIME = [
    (
        lambda: RTNQuantization(bits=4, group_size=48),
        names("group_size (model.layers.0.", "=48", "divisor"),
    ),
    (lambda: MagnitudePruning(pattern="2:5"), names("pattern='2:5'", "32 inputs")),
    (lambda: RTNQuantization(bits=4, targets="no_such_layer"), "targets='no_such_layer'"),
    (lambda: LoRAFineTune(), names("LoRAFineTune trains", "`fit`", "apply()")),
    (lambda: QuantizationAwareTraining(bits=4), names("QuantizationAwareTraining trains", "fit")),
    (lambda: DeadZoneQuantization(bits=4), names("DeadZoneQuantization trains", "apply()")),
    (lambda: Wanda(sparsity=0.5), names("calibration data", "dataloader=")),
]


@pytest.mark.parametrize(("make", "match"), RUN_TIME, ids=range(len(RUN_TIME)))
def test_refused_when_applied(model, make, match):
    stage = make()
    assert_refused(lambda: stage.apply(model), PPQConfigError, match, model=model)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPTQ(bits=4, device="cuda", num_calibration_batches=2),
        lambda: SparseGPT(sparsity=0.5, device="cuda:0", num_calibration_batches=2),
        lambda: ChannelPruning(ratio=0.25, device="cuda", num_calibration_batches=2),
        lambda: BasisSharing(2, ratio=0.5, whiten=True, device="cuda", num_calibration_batches=2),
    ],
    ids=["gptq", "sparsegpt", "channels", "sharing"],
)
def test_a_cuda_device_without_cuda(monkeypatch, make):
    model = tiny_causal_lm(LLAMA, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage = make()
    assert_refused(
        lambda: stage.apply(model, dataloader=_batches()),
        PPQConfigError,
        names(f"device={stage.device!r}", "CUDA is not available"),
        model=model,
    )


def test_a_head_tied_to_the_embedding():
    tied = tiny_causal_lm({**LLAMA, "tie_word_embeddings": True}, 1)
    stage = RTNQuantization(bits=4, targets="lm_head")
    assert_refused(
        lambda: stage.apply(tied),
        PPQConfigError,
        names("targets='lm_head'", "lm_head", "tied to model.embed_tokens", "Untie", "leave"),
        model=tied,
    )


def test_a_changed_stage_on_a_compressed_model(model):
    RTNQuantization(bits=4, name="Q").apply(model)
    changed = RTNQuantization(bits=3, name="Q")
    assert_refused(
        lambda: changed.check_not_replaced(model),
        PPQConfigError,
        names("stage 'Q'", "'bits': 4", "'bits': 3", "dense model", "another `name`"),
        model=model,
    )


def test_a_compressed_state_dict_into_a_fresh_module(tmp_path):
    source = CausalLMModule(model_config=TINY_LLAMA)
    RTNQuantization(bits=4).apply(source)
    fresh = CausalLMModule(model_config=TINY_LLAMA)
    assert_refused(
        lambda: fresh.load_state_dict(source.state_dict()),
        PPQConfigError,
        names("ppq_state", "enable_state_loading(model)", "load_from_checkpoint"),
        model=fresh,
        folder=tmp_path,
    )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Wanda(sparsity=0.5, nsamples=4), r"Wanda got 'nsamples'.*num_calibration_batches"),
        (
            lambda: DepGraphPruning(ratio=0.25, num_calibration_batches=2),
            r"DepGraphPruning got 'num_calibration_batches'.*ratio",
        ),
        (lambda: MagnitudePruning(sparsity=0.5, sparsty=0.4), r"got 'sparsty'.*sparsity"),
    ],
)
def test_an_argument_a_method_does_not_take_is_named_with_the_ones_it_takes(build, match):
    """It was a raw TypeError from the method's config dataclass."""
    with pytest.raises(PPQConfigError, match=match):
        build()


def test_a_study_without_validation_data_is_refused_when_built(tiny_lm):
    """OrderStudy(module, None, ...) ran until the first evaluation: AttributeError."""
    from ppq_lightning.study.engine import OrderStudy

    with pytest.raises(PPQConfigError, match=r"datamodule=None.*from_datasets"):
        OrderStudy(tiny_lm, None, stages=[MagnitudePruning(sparsity=0.5, name="P")])


def test_a_schedule_of_stages_counting_from_different_b_orig_is_refused():
    """One table mixed C from 32 and 16 bits (the dense row said 32, the final C used 16)."""
    stages = [MagnitudePruning(sparsity=0.5, b_orig=32), RTNQuantization(bits=4, b_orig=16)]
    with pytest.raises(PPQConfigError, match=r"different b_orig \(magnitude: 32, rtn: 16\)"):
        CompressionSchedule(stages=stages)
