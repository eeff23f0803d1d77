import pytest

from ppq_lightning.callbacks import GPTQ, MagnitudePruning, RTNQuantization, SparseGPT, Wanda
from ppq_lightning.errors import CompressionError, PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.bad_inputs.helpers import assert_refused, assert_same_state, model_fingerprint
from tests.helpers import TINY_LLAMA, token_batches


def _lm():
    return CausalLMModule(model_config=TINY_LLAMA, seed=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "stage", [MagnitudePruning(sparsity=0.5), RTNQuantization(bits=4), GPTQ(bits=4)]
)
def test_non_finite_weights_are_refused_naming_the_layer_before_anything_changes(stage, value):
    module = _lm()
    layer = module.model.model.layers[1].mlp.down_proj
    layer.weight.data[0, 0] = value
    assert_refused(
        lambda: stage.apply(module, dataloader=token_batches(2)),
        PPQConfigError,
        r"non-finite weights in 1 layer\(s\): "
        r"model\.model\.layers\.1\.mlp\.down_proj \(1 NaN/Inf\)",
        model=module,
    )


def _nan_after(module, output):
    if isinstance(output, tuple):
        return (output[0] * float("nan"), *output[1:])
    return output * float("nan")


@pytest.mark.parametrize(
    "stage",
    [
        GPTQ(bits=4, num_calibration_batches=2),
        SparseGPT(sparsity=0.5, num_calibration_batches=2),
        Wanda(sparsity=0.5, num_calibration_batches=2),
    ],
)
def test_a_stage_failing_in_a_later_block_restores_the_earlier_ones(stage):
    module = _lm()
    # NaN activations from block 1 on: block 0 is compressed first, then block 1 fails
    module.model.model.layers[0].register_forward_hook(lambda m, i, out: _nan_after(m, out))
    before = model_fingerprint(module)
    with pytest.raises((CompressionError, PPQConfigError, RuntimeError)) as info:
        stage.apply(module, dataloader=token_batches(2))
    assert any("restored" in note for note in getattr(info.value, "__notes__", []))
    assert_same_state(before, module)


def test_a_stage_applied_twice_to_one_model_is_refused():
    module = _lm()
    MagnitudePruning(sparsity=0.5).apply(module)
    assert_refused(
        lambda: MagnitudePruning(sparsity=0.5).apply(module),
        PPQConfigError,
        "stage 'magnitude' .* is already applied to this model",
        model=module,
    )
    MagnitudePruning(sparsity=0.5, name="again").apply(module)  # a deliberate second stage
