"""A stage's identity: every argument that can change the weights, never its name (#25)."""

import pytest
import torch

import ppq_lightning.callbacks as callbacks
from ppq_lightning.callbacks import (
    GPTQ,
    CompressionCallback,
    JointStructuralMixedPrecision,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.callbacks.registry import callback_parameters
from ppq_lightning.compressed.state import applied_stages, compressed_modules
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.study.engine import OrderStudy

# arguments of the Lightning adapter: when it fires, what it logs, where and how the model runs,
# where its progress is saved, what it is called; none of them can change the weights a stage
# produces
ADAPTER = {
    "name",
    "b_orig",
    "log_layers",
    "at_epoch",
    "at_step",
    "device",
    "forward_fn",
    "block_checkpoints",
}
ALIASES = {LoRAFineTune: {"target_modules": "targets"}}


def _methods() -> list[type[CompressionCallback]]:
    found = [getattr(callbacks, n) for n in callbacks.__all__]
    return [
        c
        for c in found
        if isinstance(c, type)
        and issubclass(c, CompressionCallback)
        and c is not CompressionCallback
        and "default_name" in vars(c)
    ]


@pytest.mark.parametrize("cls", _methods(), ids=lambda c: c.__name__)
def test_every_argument_is_a_config_field_or_an_adapter_argument(cls):
    fields = set(cls.config_class.__dataclass_fields__)
    aliases = ALIASES.get(cls, {})
    for parameter in callback_parameters(cls) - ADAPTER:
        assert aliases.get(parameter, parameter) in fields, (cls.__name__, parameter)
    assert fields & ADAPTER <= {"b_orig"}, cls.__name__  # b_orig where the math reads it


def test_targets_ignore_and_solver_arguments_are_part_of_the_identity():
    assert (
        RTNQuantization(bits=4, targets="mlp").identity
        != RTNQuantization(bits=4, targets="self_attn").identity
    )
    assert RTNQuantization(bits=4).identity != RTNQuantization(bits=4, ignore="v_proj").identity
    base = GPTQ(bits=4)
    for changed in (
        {"damp": 0.5},
        {"statistics_dtype": "float64"},
        {"num_calibration_batches": 4},
        {"calibrate_on": "original"},
        {"block_size": 64},
    ):
        assert GPTQ(bits=4, **changed).identity != base.identity, changed
    assert SparseGPT(sparsity=0.5).identity != SparseGPT(sparsity=0.5, damp=0.3).identity
    assert Wanda(sparsity=0.5).identity != Wanda(sparsity=0.5, num_calibration_batches=4).identity


def test_nothing_cosmetic_is_part_of_the_identity():
    plain = RTNQuantization(bits=4)
    for cosmetic in ({"name": "Q4"}, {"log_layers": False}, {"b_orig": 32}):
        assert RTNQuantization(bits=4, **cosmetic).identity == plain.identity, cosmetic
    assert GPTQ(bits=4, device="cpu").identity == GPTQ(bits=4).identity
    assert GPTQ(bits=4, block_checkpoints=False).identity == GPTQ(bits=4).identity
    # one meaning, one spelling
    assert RTNQuantization(bits=4, targets="mlp").identity == (
        RTNQuantization(bits=4, targets=["mlp"]).identity
    )
    assert MagnitudePruning(sparsity=0).identity == MagnitudePruning(sparsity=0.0).identity
    assert MagnitudePruning(pattern="2:4").identity == (
        MagnitudePruning(sparsity=0.5, pattern="2:4").identity
    )
    # the name tells deliberate repeats apart in a run and a history, not in the identity
    named = RTNQuantization(bits=4, name="Q4")
    assert named.state_key == f"{plain.identity}@Q4" and plain.state_key == plain.identity


def test_rtn_on_two_target_sets_applies_twice_to_one_model(tiny_lm):
    mlp, attention = (RTNQuantization(bits=4, targets=t) for t in ("mlp", "self_attn"))
    mlp.apply(tiny_lm)
    attention.apply(tiny_lm)  # was refused as "already applied" when targets were left out
    assert {mlp.state_key, attention.state_key} <= applied_stages(tiny_lm)
    layers = dict(tiny_lm.named_modules())
    assert all(
        len(torch.unique(weight_matrix(layers[n])[0])) <= 16
        for n in ("model.model.layers.0.mlp.up_proj", "model.model.layers.0.self_attn.q_proj")
    )


def _study(module, data, stage, folder, curve=()):
    return OrderStudy(module, data, [stage], curve=list(curve), output_dir=folder).run()


def test_studies_share_cells_by_identity_only(tmp_path, tiny_lm, tiny_data):
    first = _study(tiny_lm, tiny_data, RTNQuantization(bits=4, targets="mlp", name="Q"), tmp_path)
    assert first.budget.evaluations == 2  # dense and Q
    other = _study(
        tiny_lm, tiny_data, RTNQuantization(bits=4, targets="self_attn", name="Q"), tmp_path
    )
    assert other.budget.evaluations == 1 and other.budget.cached == 1  # only dense is shared
    assert other.singles["Q"].value != first.singles["Q"].value
    renamed = _study(tiny_lm, tiny_data, RTNQuantization(bits=4, targets="mlp", name="A"), tmp_path)
    assert renamed.budget.evaluations == 0  # a name is not an identity
    assert renamed.singles["A"].value == first.singles["Q"].value
    assert renamed.singles["A"].order == "A"  # reported under the name asked for


def test_gptq_with_other_solver_arguments_gets_new_cells(tmp_path, tiny_lm, tiny_data):
    def gptq(**kwargs):
        return GPTQ(bits=4, name="Q", num_calibration_batches=2, log_layers=False, **kwargs)

    assert _study(tiny_lm, tiny_data, gptq(), tmp_path).budget.evaluations == 2
    for changed in ({"damp": 0.5}, {"statistics_dtype": "float64"}):
        again = _study(tiny_lm, tiny_data, gptq(**changed), tmp_path)
        assert again.budget.evaluations == 1, changed  # its own single, dense reused
    fewer = GPTQ(bits=4, name="Q", num_calibration_batches=1, log_layers=False)
    assert _study(tiny_lm, tiny_data, fewer, tmp_path).budget.evaluations == 1


def test_a_curve_stage_and_a_study_stage_of_one_identity_are_measured_once(
    tmp_path, tiny_lm, tiny_data
):
    q = RTNQuantization(bits=4, name="Q4")
    result = _study(tiny_lm, tiny_data, q, tmp_path, curve=[RTNQuantization(bits=4, name="RTN4")])
    assert result.budget.evaluations == 2  # dense, and Q4 = RTN4 once
    assert result.singles["Q4"].value == result.curve[0].value
    assert (result.curve[0].order, result.curve[0].kind) == ("RTN4", "curve")


def test_a_model_compressed_by_an_older_identity_is_refused_clearly(tiny_lm):
    stage = RTNQuantization(bits=4, name="Q")
    stage.apply(tiny_lm)
    for _, _, state in compressed_modules(tiny_lm):
        for entry in state.history:
            entry["stage"] = "RTNQuantization{'name': 'Q', 'bits': 4}"  # a version-1 key
    assert stage.state_key not in applied_stages(tiny_lm)
    with pytest.raises(PPQConfigError, match="earlier ppq-lightning whose stage identities"):
        RTNQuantization(bits=4, name="Q").check_not_replaced(tiny_lm)


def test_apply_without_a_trainer_refuses_an_older_identity_too(tiny_lm):
    RTNQuantization(bits=4, name="Q").apply(tiny_lm)
    for _, _, state in compressed_modules(tiny_lm):
        for entry in state.history:
            entry["stage"] = "RTNQuantization{'name': 'Q', 'bits': 4}"
    with pytest.raises(PPQConfigError, match="earlier ppq-lightning whose stage identities"):
        RTNQuantization(bits=4, name="Q").apply(tiny_lm)


def test_a_config_field_cannot_be_set_on_a_built_stage():
    stage = GPTQ(bits=4)
    with pytest.raises(PPQConfigError, match=r"GPTQ.damp is a field of the stage's frozen config"):
        stage.damp = 10.0
    assert stage.damp == 0.01 and stage.identity == GPTQ(bits=4).identity
    stage.forward_fn = print  # adapter attributes stay settable


def test_the_order_of_layer_bits_is_part_of_the_identity():
    first = RTNQuantization(bits=4, layer_bits={"mlp": 8, "up_proj": 2})
    second = RTNQuantization(bits=4, layer_bits={"up_proj": 2, "mlp": 8})
    assert first.identity != second.identity  # the first matching regex wins


def test_b_orig_is_part_of_the_identity_where_the_math_reads_it():
    assert JointStructuralMixedPrecision(budget=6, b_orig=16).identity != (
        JointStructuralMixedPrecision(budget=6, b_orig=32).identity
    )  # its budget is a measured C, in units of B_orig
    assert RTNQuantization(bits=4, b_orig=32).identity == RTNQuantization(bits=4).identity
