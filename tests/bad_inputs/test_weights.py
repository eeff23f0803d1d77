"""The catalogue, part weights a stage cannot compress, checkpoints whose weights are not their
recorded state, and calibration data that says nothing about a layer (issue #27, points 4 and 8).

Each refusal is made before any weight changes (``assert_refused`` compares the model's whole
state dict), and names the layer and the fix."""

import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from ppq_lightning.callbacks import GPTQ, MagnitudePruning, RTNQuantization, SparseGPT, Wanda
from ppq_lightning.callbacks.calibrated import UninformativeCalibrationWarning
from ppq_lightning.compressed.invariants import CHECK_AFTER_STAGES, check_invariants
from ppq_lightning.compressed.state import get_state, record_mask
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import CompressionError, InvariantError, PPQConfigError
from ppq_lightning.export.checkpoint import load_lightning_checkpoint
from ppq_lightning.modules.targets import ComputedWeightWarning
from tests.bad_inputs.helpers import assert_refused, names


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    )


def _data(scale: float = 1.0, n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=generator) * scale for _ in range(n)]


# -- parametrized weights ---------------------------------------------------------------------
def _weight_norm(model: nn.Module) -> None:
    parametrizations.weight_norm(model[2])


def _spectral_norm(model: nn.Module) -> None:
    parametrizations.spectral_norm(model[2])


def _old_weight_norm(model: nn.Module) -> None:
    with warnings.catch_warnings():  # torch deprecates it, users still have it
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[2])


PARAMETRIZED = [
    (_weight_norm, names("_WeightNorm", 'remove_parametrizations(layer, "weight")')),
    (_spectral_norm, names("_SpectralNorm", "remove_parametrizations")),
    (_old_weight_norm, names("torch.nn.utils.weight_norm", "remove_weight_norm(layer)")),
]
STAGES = [
    lambda: MagnitudePruning(sparsity=0.5, targets=r"^[02]$"),
    lambda: RTNQuantization(bits=2, targets=r"^[02]$"),
    lambda: GPTQ(bits=3, targets=r"^[02]$", num_calibration_batches=2),
]


@pytest.mark.parametrize(("parametrize_layer", "match"), PARAMETRIZED)
@pytest.mark.parametrize("make", STAGES)
def test_a_parametrized_weight_selected_by_targets_is_refused(parametrize_layer, match, make):
    # before: a 50 % mask and a 2-bit grid were recorded while the layer's forward kept its
    # weight (0 % zeros, 16 levels per row)
    model = _mlp()
    parametrize_layer(model)
    info = assert_refused(
        lambda: make().apply(model, dataloader=_data()),
        PPQConfigError,
        names("selects 2", "computed by", "ignore=") + match,
        model,
    )
    assert "Nothing was changed" in str(info.value)


def test_default_targets_leave_a_parametrized_layer_out_with_a_warning():
    model = _mlp()  # 0 (stem), 2, 4 (output): 2 and a new 4 are default targets
    model.insert(4, nn.Linear(32, 32))
    model.insert(5, nn.ReLU())
    _weight_norm(model)
    before = model[2].weight.detach().clone()
    stage = MagnitudePruning(sparsity=0.5)
    with pytest.warns(ComputedWeightWarning, match=names("out 1 layer", "2 (", "_WeightNorm")):
        stage.apply(model, dataloader=_data())
    assert torch.equal(model[2].weight, before) and get_state(model[2]) is None
    assert get_state(model[4]) is not None and (model[4].weight == 0).float().mean() == 0.5
    assert check_invariants(model) == 1
    assert parametrize.is_parametrized(model[2], "weight")  # still the user's layer


def test_a_model_whose_every_default_target_is_parametrized_says_why_nothing_matched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    for i in (0, 2):
        parametrizations.weight_norm(model[i])
    assert_refused(
        lambda: RTNQuantization(bits=4).apply(model),
        PPQConfigError,
        names("matched no", "left out 0, 2", "_WeightNorm", "remove_parametrizations"),
        model,
    )


# -- Parameters shared between selected layers ------------------------------------------------
def _shared() -> nn.Sequential:
    model = _mlp()
    model[4] = nn.Linear(32, 32)
    model[4].weight = model[2].weight  # one nn.Parameter in two selected layers
    return model


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPTQ(bits=3, targets=r"^[24]$", num_calibration_batches=2),
        lambda: RTNQuantization(bits=4, targets=r"^[24]$", layer_bits={"^4$": 2}),
        lambda: MagnitudePruning(sparsity=0.5, targets=r"^[24]$"),
    ],
)
def test_a_parameter_shared_by_two_selected_layers_is_refused_naming_both(make):
    # before: GPTQ solved the tensor twice (two Hessians) and mixed-precision RTN rounded it to
    # 4 then 2 bits: one of the two layers ended off its recorded grid
    model = _shared()
    assert_refused(
        lambda: make().apply(model, dataloader=[torch.randn(8, 16) for _ in range(2)]),
        PPQConfigError,
        names("selects 2 and 4", "the same weight", "nn.Parameter(", "ignore"),
        model,
    )


# -- invariants checked after every stage (in tests) and on every load ------------------------
def test_the_test_suite_checks_the_invariants_after_every_stage(monkeypatch):
    # a stage that records a mask its weights do not have fails in the test that ran it
    import os

    assert os.environ.get(CHECK_AFTER_STAGES) == "1"  # tests/conftest.py
    model = _mlp()

    def compress(model, modules):  # a broken stage: records, then writes its weight back
        for module in modules.values():
            weight = module.weight.detach().clone()
            record_mask(module, torch.rand(module.weight.shape) > 0.5)
            module.weight.data.copy_(weight)
        return {}

    stage = MagnitudePruning(sparsity=0.5, targets=r"^0$")
    monkeypatch.setattr(stage, "compress", compress)
    with pytest.raises(InvariantError, match=names("0:", "pruned weight(s) are non-zero")):
        stage.apply(model)
    monkeypatch.delenv(CHECK_AFTER_STAGES)
    MagnitudePruning(sparsity=0.5, targets=r"^0$", name="again").apply(model)  # not checked


def _compressed_state_dict() -> dict[str, torch.Tensor]:
    model = _mlp()
    MagnitudePruning(sparsity=0.5, targets=r"^0$").apply(model)
    RTNQuantization(bits=4, targets=r"^[02]$").apply(model)
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
    }


def _fresh() -> nn.Sequential:
    model = _mlp()
    enable_state_loading(model)
    return model


def test_a_checkpoint_with_a_weight_off_its_grid_is_refused_naming_the_layer():
    state = _compressed_state_dict()
    state["2.weight"][0, 0] = 1.4e37  # a bit flip: finite, far off the 4-bit grid
    with pytest.raises(InvariantError, match=names("2:", "off the 4-bit grid", "corrupt")):
        _fresh().load_state_dict(state)


def test_a_checkpoint_with_a_pruned_weight_non_zero_is_refused_naming_the_layer():
    state = _compressed_state_dict()
    weight, mask = state["0.weight"], state["0.ppq_state.mask_bits"]
    assert mask.numel()  # layer 0 is pruned
    pruned = (weight == 0).nonzero()[0]
    weight[tuple(pruned)] = state["0.ppq_state.scale"][pruned[0], 0]  # a grid point, not 0
    with pytest.raises(InvariantError, match=names("0:", "pruned weight(s) are non-zero")):
        _fresh().load_state_dict(state)


def test_a_checkpoint_with_a_non_finite_weight_is_refused_before_anything_is_loaded():
    state = _compressed_state_dict()
    state["4.weight"][1, 1] = float("nan")  # an uncompressed layer too
    model = _fresh()
    assert_refused(
        lambda: model.load_state_dict(state),
        PPQConfigError,
        names("1 NaN or infinite", "4.weight", "nothing was loaded"),
        model,
    )


def test_a_consistent_checkpoint_loads():
    state = _compressed_state_dict()
    model = _fresh()
    model.load_state_dict(state)
    assert check_invariants(model) == 2


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_bit_flipped_lightning_checkpoint_is_refused_by_the_loader(tmp_path):
    module = _Module()
    RTNQuantization(bits=4, targets=r"net\.[02]$").apply(module)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["net.0.weight"][3, 3] = 1.4e37
    torch.save(checkpoint, path)
    with pytest.raises(
        InvariantError, match=names(f"{path}: ", "net.0:", "off the 4-bit grid")
    ) as info:
        load_lightning_checkpoint(path, _Module)
    # bad input, so `ppq export --ckpt` ends with one line (exit 2), not an 11-frame traceback
    assert isinstance(info.value, PPQConfigError)


# -- calibration: Hessian errors and inputs that say nothing -----------------------------------
def test_a_hessian_error_quotes_the_users_damp_and_names_the_layer():
    # before: "the Hessian is not positive definite even with damp=10." for damp=0.01, no layer
    model = _mlp()
    info = assert_refused(
        lambda: GPTQ(bits=4, damp=0.01, targets=".", num_calibration_batches=4).apply(
            model, dataloader=_data(scale=1e19)
        ),
        CompressionError,
        names("layer 0", "damp=0.01 (as given)", "0.1, 1, 10", "NaN or infinite", "restored"),
        model,
    )
    assert "damp=10 " not in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPTQ(bits=4, targets=r"^0$", num_calibration_batches=4),
        lambda: SparseGPT(sparsity=0.5, targets=r"^0$", num_calibration_batches=4),
        lambda: Wanda(sparsity=0.5, targets=r"^0$", num_calibration_batches=4),
    ],
)
def test_all_zero_calibration_inputs_warn_and_do_not_zero_the_layer(make):
    # before: GPTQ and SparseGPT zeroed the whole layer (every input "dead"), silently
    model = _mlp()
    before = model[0].weight.detach().clone()
    with pytest.warns(UninformativeCalibrationWarning, match=names("inputs of 0", "all zero")):
        make().apply(model, dataloader=_data(scale=0.0))
    weight = model[0].weight.detach()
    assert (weight != 0).float().mean() >= 0.45  # a pruned or quantized layer, not a zero one
    kept = get_state(model[0]).mask
    if kept is not None:  # pruned by magnitude: the survivors keep their values
        assert torch.equal(weight[kept], before[kept])


def test_gptq_on_all_zero_inputs_rounds_to_nearest():
    model, reference = _mlp(), _mlp()
    with pytest.warns(UninformativeCalibrationWarning):
        GPTQ(bits=4, targets=r"^0$", num_calibration_batches=4).apply(
            model, dataloader=_data(scale=0.0)
        )
    RTNQuantization(bits=4, targets=r"^0$").apply(reference)
    assert torch.allclose(model[0].weight, reference[0].weight, atol=1e-6)


def test_constant_calibration_inputs_warn_naming_the_layer():
    model = _mlp()
    row = torch.randn(1, 16)
    with pytest.warns(UninformativeCalibrationWarning, match=names("inputs of 0", "constant")):
        GPTQ(bits=4, targets=r"^0$", num_calibration_batches=2).apply(
            model, dataloader=[row.expand(8, 16) for _ in range(2)]
        )
    assert (model[0].weight != 0).float().mean() > 0.8
