"""Completing, on load, a training stage that was training when its state dict was saved."""

import copy
import warnings

import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.compressed.history import FIT_RECORD
from ppq_lightning.compressed.state import get_state, record_mask, record_stage
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.training import (
    COMPLETIONS,
    POSTERIOR_NAME,
    QUANTIZER_NAME,
    MidFitCheckpointWarning,
    attach_dead_zone_quantizer,
    attach_sqs_posterior,
    describe_fit,
    finalise_dead_zone,
    finalise_qat,
    finalise_sqs,
    fitting,
    mark_fitting,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.transforms import attach_weight_transform

QAT = {"stage": "QAT{bits=4}", "method": "QuantizationAwareTraining", "kind": "Q", "name": "qat"}
CODEQ = {
    "stage": "DZ",
    "method": "DeadZoneQuantization",
    "kind": "PQ",
    "name": "codeq",
    "bits": 4,
    "learn_bits": False,
    "temperature": 0.05,
    "init_dead_zone": 0.3,
}


def record(completion: str, entry: dict, layers: list[str], pending: bool = True) -> dict:
    stages = [{**{k: entry[k] for k in ("stage", "method", "kind", "name")}, "status": "training"}]
    if pending:
        stages.append(
            {
                "stage": "P2",
                "method": "MagnitudePruning",
                "kind": "P",
                "name": "P2",
                "status": "pending",
            }
        )
    training = {"completion": completion, "entry": entry, "layers": layers}
    return {"epoch": 1, "step": 7, "stages": stages, "training": training}


def pruned_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        record_mask(net[0], torch.rand(8, 16) > 0.5)
    record_stage(net[0], {"stage": "P", "method": "MagnitudePruning", "kind": "P", "name": "P"})
    return net


def test_a_fresh_model_completes_qat_as_its_end_would_and_says_what_is_pending():
    source = pruned_net()
    entry = {**QAT, "bits": 4, "symmetric": False}
    saved = {**source.state_dict(), FIT_RECORD: record("qat", entry, ["0", "2"])}
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    enable_state_loading(fresh)
    with pytest.warns(MidFitCheckpointWarning) as caught:
        fresh.load_state_dict(saved)  # strict: the record is not a key of the model
    message = str(caught[0].message)
    assert "taken during fit at epoch 1, step 7, before MagnitudePruning 'P2' fired" in message
    assert "it holds QuantizationAwareTraining 'qat' (training, epoch 1, step 7)" in message
    expected = copy.deepcopy(source)  # what QAT's end writes on the same latent weights
    with torch.no_grad():
        for index in (0, 2):
            finalise_qat(expected[index], {**entry, "mid_fit": {"epoch": 1, "step": 7}})
    for index in (0, 2):
        assert torch.equal(fresh[index].weight, expected[index].weight)
        assert get_state(fresh[index]).history == get_state(expected[index]).history
        assert torch.equal(get_state(fresh[index]).scale, get_state(expected[index]).scale)
    assert get_state(fresh[0]).history[-1]["mid_fit"] == {"epoch": 1, "step": 7}
    assert torch.equal(get_state(fresh[0]).mask, get_state(source[0]).mask)  # zeros kept
    assert check_invariants(fresh) == 2
    assert FIT_RECORD in saved  # the caller's dict is left as it was


def test_codeq_parameters_load_into_a_quantizer_then_the_layer_ends_on_its_grid():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 8))
    quantizer = attach_dead_zone_quantizer(source[0], 4, 0.3, 0.05, False)
    with torch.no_grad():
        quantizer.theta.fill_(-0.2)  # "learned": not the initial value
    saved = {**source.state_dict(), FIT_RECORD: record("dead_zone", CODEQ, ["0"], pending=False)}
    expected = copy.deepcopy(source)
    with torch.no_grad():
        finalise_dead_zone(expected[0], {**CODEQ, "mid_fit": {"epoch": 1, "step": 7}})
    fresh = nn.Sequential(nn.Linear(16, 8))
    enable_state_loading(fresh)
    with pytest.warns(MidFitCheckpointWarning, match="it holds DeadZoneQuantization 'codeq'"):
        fresh.load_state_dict(saved)
    assert not hasattr(fresh[0], QUANTIZER_NAME)  # its parameters end with the stage
    assert torch.equal(fresh[0].weight, expected[0].weight)
    assert get_state(fresh[0]).history == get_state(expected[0]).history
    assert torch.equal(get_state(fresh[0]).mask, get_state(expected[0]).mask)
    assert check_invariants(fresh) == 1


def test_an_sqs_posterior_on_a_convolution_collapses_after_the_load():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    entry = {
        "stage": "SQS",
        "method": "SQS",
        "kind": "PQ",
        "name": "sqs",
        "bits": 3,
        "init_inclusion": 0.9,
        "sigma": 0.5,
        "logit_scale": 10.0,
    }
    for index in (0, 2):
        posterior = attach_sqs_posterior(source[index], str(index), 3, 0.9, 0.5, 10.0)
        with torch.no_grad():  # "trained": some weights out, the mixture skewed
            posterior.inclusion_raw.copy_(torch.randn_like(posterior.inclusion_raw) * 0.3)
            posterior.mixture_raw.copy_(torch.randn_like(posterior.mixture_raw) * 0.1)
    saved = {**source.state_dict(), FIT_RECORD: record("sqs", entry, ["0", "2"], pending=False)}
    expected = copy.deepcopy(source)
    with torch.no_grad():
        for index in (0, 2):
            finalise_sqs(expected[index], {**entry, "mid_fit": {"epoch": 1, "step": 7}})
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    enable_state_loading(fresh)
    with pytest.warns(MidFitCheckpointWarning):
        fresh.load_state_dict(saved)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh(x), expected(x)) and not hasattr(fresh[0], POSTERIOR_NAME)
    assert 0 < get_state(fresh[0]).mask.float().mean() < 1
    assert check_invariants(fresh) == 2


def test_a_model_that_trains_the_stage_itself_loads_the_training_state_as_it_is():
    """A resumed fit: the layers are set up by the stage before the restore."""
    source = pruned_net()
    saved = {**source.state_dict(), FIT_RECORD: record("qat", {**QAT, "bits": 4}, ["0", "2"])}
    resumed = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    for index in (0, 2):
        attach_weight_transform(resumed[index], lambda w: w)
    enable_state_loading(resumed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MidFitCheckpointWarning)
        resumed.load_state_dict(saved)
    assert torch.equal(resumed[0].weight, source[0].weight)  # latent, not quantized
    assert [e["stage"] for e in get_state(resumed[0]).history] == ["P"]
    assert get_state(resumed[2]) is None


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            {"completion": "distill", "layers": ["0"]},
            r"completion 'distill' .*known: dead_zone, lora, qat, sqs",
        ),
        ({"completion": "qat", "layers": ["9"]}, r"layer 9, which this Sequential lacks"),
    ],
)
def test_a_record_that_cannot_be_completed_is_refused_before_any_weight_loads(bad, match):
    source = pruned_net()
    fit = record("qat", {**QAT, "bits": 4}, ["0"])
    fit["training"] = {**fit["training"], **bad}
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    before = fresh[0].weight.clone()
    enable_state_loading(fresh)
    with pytest.raises(PPQConfigError, match=match):
        fresh.load_state_dict({**source.state_dict(), FIT_RECORD: fit})
    assert torch.equal(fresh[0].weight, before)


def test_something_else_under_the_record_key_is_refused():
    fresh = nn.Sequential(nn.Linear(16, 8))
    enable_state_loading(fresh)
    with pytest.raises(PPQConfigError, match="is not a fit record"):
        fresh.load_state_dict({**fresh.state_dict(), FIT_RECORD: [1, 2]})


def test_describe_without_pending_stages():
    fit = record("lora", {**QAT, "method": "LoRAFineTune", "name": "L"}, ["0"], pending=False)
    fit["stages"].insert(
        0,
        {"stage": "P", "method": "MagnitudePruning", "kind": "P", "name": "P", "status": "applied"},
    )
    text = describe_fit(fit)
    assert "fired" not in text and "pending" not in text
    assert "it holds MagnitudePruning 'P', LoRAFineTune 'L' (training, epoch 1, step 7)" in text
    assert COMPLETIONS["lora"].result in text


# -- a fit without a training stage: stages not fired, a ramp ramping ----------------------
RAMPING = {
    "stage": "R",
    "method": "MagnitudePruning",
    "kind": "P",
    "name": "R",
    "status": "ramping",
    "ramp": {
        "start_step": 1,
        "end_step": 5,
        "target": 0.5,
        "masks_recorded": True,
        "sparsity": 0.25,
    },
}
NOT_FIRED = {"stage": "Q", "method": "RTNQuantization", "kind": "Q", "name": "Q"}
NOT_FIRED["status"] = "pending"


def test_a_record_without_a_training_stage_says_what_ramped_and_what_had_not_fired():
    text = describe_fit({"epoch": 0, "step": 3, "stages": [RAMPING, NOT_FIRED]})
    assert "at epoch 0, step 3, before RTNQuantization 'Q' fired" in text
    assert ", while MagnitudePruning 'R' ramped" in text
    assert "it holds MagnitudePruning 'R' mid-ramp (sparsity 0.250 so far, 0.5 when it " in text
    assert "masks so far are recorded and kept, the stage is not" in text
    assert "training stage" not in text and "not fired or finished are not applied" in text


def test_a_fresh_model_warns_a_model_being_fit_loads_the_record_silently():
    """A fresh model's load says what the state dict holds; the same load while a running fit
    trains the model (a resume with ``ckpt_path``) says nothing; once that fit is over, a
    load is a fresh one again."""
    source = pruned_net()
    saved = {**source.state_dict(), FIT_RECORD: {"epoch": 0, "step": 3, "stages": [NOT_FIRED]}}
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    enable_state_loading(fresh)
    with pytest.warns(MidFitCheckpointWarning, match="before RTNQuantization 'Q' fired"):
        fresh.load_state_dict(saved)
    assert torch.equal(fresh[0].weight, source[0].weight)
    running = [True]
    mark_fitting(fresh, lambda: running[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MidFitCheckpointWarning)
        fresh.load_state_dict(saved)
    running[0] = False  # the fit ended (failed) without detaching
    with pytest.warns(MidFitCheckpointWarning):
        fresh.load_state_dict(saved)
    mark_fitting(fresh, None)
    assert not fitting(fresh)
