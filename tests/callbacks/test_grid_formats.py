"""NVFP4, MXFP4, FP8 and GGUF K-quant grids through the quantizers (issue #29)."""

import pytest
import torch

from ppq_lightning import compression_summary
from ppq_lightning.callbacks import (
    GPTQ,
    JointStructuralMixedPrecision,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
    SparseGPT,
)
from ppq_lightning.compressed.invariants import check_invariants
from ppq_lightning.compressed.state import get_state
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.float_grid import FloatGrid
from ppq_lightning.ops.grid_formats import GRID_FORMATS, GridSpec
from ppq_lightning.ops.kquants import KQuantGrid
from tests.helpers import TINY_LLAMA, state_copy

# rows and columns every format holds: 128-row blocks, 256-column K-quant super-blocks
WIDE_LLAMA = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512}


def wide_lm(layers: int = 2):
    from ppq_lightning.models import CausalLMModule

    return CausalLMModule(model_config={**WIDE_LLAMA, "num_hidden_layers": layers}, seed=0)


def _stage_args(format: str) -> dict:
    return {"bits": 4} if format == "int" else {"format": format}


@pytest.mark.parametrize("format", GRID_FORMATS)
def test_rtn_records_the_format_and_c_counts_its_scales(format):
    model = wide_lm()
    RTNQuantization(**_stage_args(format)).apply(model)
    modules = resolve_targets(model)
    expected_bits, numel = 0.0, 0
    for name, module in modules.items():
        state = get_state(module)
        assert state.grid_format == format, name
        grid = state.grid
        kind = {"int": "QuantGrid"}.get(format, "KQuantGrid" if format[0] == "Q" else "FloatGrid")
        assert type(grid).__name__ == kind
        w = weight_matrix(module)
        assert torch.equal(grid.fake_quantize(w), w), name  # on its grid, exactly
        rows, cols = w.shape
        spec = GridSpec.of(format, 4 if format == "int" else None)
        expected_bits += spec.storage(rows, cols).total_bits
        numel += rows * cols
    assert check_invariants(model) == len(modules)
    summary = compression_summary(model)
    assert summary.measured_C == pytest.approx(16 * numel / expected_bits)


@pytest.mark.parametrize("format", ["nvfp4", "fp8_block", "Q4_K", "Q6_K"])
def test_a_checkpoint_brings_the_grid_back(format):
    model = wide_lm()
    RTNQuantization(format=format).apply(model)
    saved = state_copy(model)
    fresh = wide_lm()
    enable_state_loading(fresh)
    fresh.load_state_dict(saved)
    for name, module in resolve_targets(model).items():
        again = get_state(fresh.get_submodule(name))
        assert again.grid_format == format
        a, b = get_state(module).grid, again.grid
        w = weight_matrix(module)
        assert torch.equal(b.quantize(w), a.quantize(w)) and torch.equal(
            b.dequantize(a.quantize(w)), w
        )
    assert check_invariants(fresh) == len(resolve_targets(fresh))


@pytest.mark.parametrize("format", ["nvfp4", "mxfp4", "Q4_K"])
def test_both_orders_keep_zeros_and_grid(format):
    """P>Q: the grid holds 0 exactly, so pruned weights stay 0; Q>P: pruning zeroes weights,
    and 0 is a level of every grid, so the survivors and the zeros are on it."""
    for stages in (
        [MagnitudePruning(sparsity=0.5), RTNQuantization(format=format)],
        [RTNQuantization(format=format), MagnitudePruning(sparsity=0.5)],
    ):
        model = wide_lm()
        for stage in stages:
            stage.apply(model)
        for name, module in resolve_targets(model).items():
            state = get_state(module)
            w = weight_matrix(module)
            assert torch.all(w[~state.mask] == 0), name
            assert torch.equal(state.grid.fake_quantize(w), w), name
        check_invariants(model)


@pytest.mark.parametrize("format", ["nvfp4", "fp8", "Q4_K_M"])
def test_gptq_rounds_to_the_format(format, tiny_data):
    model = wide_lm()
    GPTQ(format=format, num_calibration_batches=2).apply(
        model, dataloader=tiny_data.calibration_dataloader()
    )
    for name, module in resolve_targets(model).items():
        state = get_state(module)
        grid = state.grid
        assert isinstance(grid, KQuantGrid if format == "Q4_K_M" else FloatGrid), name
        w = weight_matrix(module)
        assert torch.equal(grid.fake_quantize(w), w), name
    check_invariants(model)


def test_sparsegpt_joint_mode_on_nvfp4_and_pruning_a_quantized_layer(tiny_data):
    model = wide_lm()
    SparseGPT(sparsity=0.5, format="nvfp4", num_calibration_batches=2).apply(
        model, dataloader=tiny_data.calibration_dataloader()
    )
    for module in resolve_targets(model).values():
        assert get_state(module).grid_format == "nvfp4"
    check_invariants(model)
    model = wide_lm()  # Q>P with weight updates: survivors go back onto the FP8 grid
    RTNQuantization(format="fp8").apply(model)
    SparseGPT(sparsity=0.5, num_calibration_batches=2).apply(
        model, dataloader=tiny_data.calibration_dataloader()
    )
    for module in resolve_targets(model).values():
        state = get_state(module)
        assert state.grid_format == "fp8" and state.mask is not None
    check_invariants(model)


def test_mixed_formats_per_layer():
    model = wide_lm()
    RTNQuantization(format="nvfp4", layer_bits={"down_proj": "fp8", "q_proj": 16}).apply(model)
    for name, module in resolve_targets(model).items():
        state = get_state(module)
        expected = "fp8" if "down_proj" in name else None if "q_proj" in name else "nvfp4"
        assert (state.grid_format if state is not None else None) == expected, name
    check_invariants(model)


def test_q4_k_m_gives_q6_k_where_llama_cpp_does():
    """8 blocks: use_more_bits(i, 8) holds for i = 0 (first eighth), 7 (last eighth), 3 and 6
    ((i - 1) % 3 == 2), for attention V and FFN down alike; everything else is Q4_K."""
    model = wide_lm(layers=8)
    RTNQuantization(format="Q4_K_M").apply(model)
    for name, module in resolve_targets(model).items():
        block = int(name.split(".layers.")[1].split(".")[0])
        more = ("v_proj" in name or "down_proj" in name) and block in (0, 3, 6, 7)
        assert get_state(module).grid_format == ("Q6_K" if more else "Q4_K"), name


def test_q4_k_m_falls_back_to_integer_blocks_on_rows_256_does_not_divide(tiny_lm):
    """Width 64: llama.cpp writes Q5_0 for Q4_K and Q8_0 for Q6_K; here they are symmetric
    5- and 8-bit integer grids in groups of 32."""
    RTNQuantization(format="Q4_K_M").apply(tiny_lm)
    for name, module in resolve_targets(tiny_lm).items():
        state = get_state(module)
        more = ("v_proj" in name or "down_proj" in name) and ".layers.1." in name  # the last 8th
        assert (state.grid_format, state.bits, state.group_size, state.symmetric) == (
            "int",
            8 if more else 5,
            32,
            True,
        ), name


def test_a_layer_the_format_cannot_hold_is_refused_before_any_weight_changes(tiny_lm):
    before = state_copy(tiny_lm)
    with pytest.raises(PPQConfigError, match=r"multiple of 256") as error:
        RTNQuantization(format="Q4_K").apply(tiny_lm)
    assert "q_proj" in str(error.value)
    after = tiny_lm.state_dict()
    assert all(
        torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor)
    )
    with pytest.raises(PPQConfigError, match=r"rows divisible by 128"):
        GPTQ(format="fp8_block").apply(tiny_lm)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RTNQuantization(bits=8, format="nvfp4"), r"bits=8 .*format='nvfp4'"),
        (lambda: RTNQuantization(format="mxfp4", symmetric=False), r"symmetric=False"),
        (lambda: GPTQ(format="nvfp4", group_size=128), r"group_size=128 .*expected 16"),
        (
            lambda: RTNQuantization(format="nvfp4", layer_bits={"down": 8}),
            r"layer_bits\['down'\]=8",
        ),
        (lambda: RTNQuantization(format="nvfp4", layer_bits={"down": "Q4_K_M"}), r"Q4_K_M"),
        (
            lambda: RTNQuantization(format="Q4_K_M", promote={"bits": "fp8", "fraction": 0.2}),
            "promote",
        ),
        (lambda: QuantizationAwareTraining(bits=4, format="nvfp4"), r"format='nvfp4' .*one of int"),
        (lambda: SparseGPT(sparsity=0.5, format="Q4_K_M"), r"format='Q4_K_M'"),
        (
            lambda: JointStructuralMixedPrecision(budget=3, bits=["nvfp4", "fp8"], keep=[1.0]),
            "largest first",
        ),
        (
            lambda: JointStructuralMixedPrecision(budget=3, bits=["fp8", "nvfp4"]),
            r"keep=.*\[1\.0\] with formats",
        ),
    ],
)
def test_bad_format_arguments_are_refused_at_construction(make, message):
    with pytest.raises(PPQConfigError, match=message):
        make()


def test_the_format_is_part_of_the_identity():
    assert RTNQuantization(format="nvfp4").identity != RTNQuantization(format="mxfp4").identity
    assert RTNQuantization(bits=4).identity != RTNQuantization(format="nvfp4").identity
    assert RTNQuantization(format="NVFP4").identity == RTNQuantization(format="nvfp4").identity
    assert RTNQuantization(format="nvfp4").identity == (
        RTNQuantization(format="nvfp4", bits=4, group_size=16, symmetric=True).identity
    )


def test_joint_search_mixes_formats(tiny_data):
    model = wide_lm()
    stage = JointStructuralMixedPrecision(
        budget=2.5, bits=["fp8", "nvfp4"], keep=[1.0], num_calibration_batches=2, score_batches=1
    )
    stage.apply(model, dataloader=tiny_data.calibration_dataloader())
    formats = {get_state(m).grid_format for m in resolve_targets(model).values()}
    assert formats <= {"fp8", "nvfp4"} and "nvfp4" in formats
    assert compression_summary(model).measured_C >= 2.5
    check_invariants(model)


@pytest.mark.parametrize("stage_class", [RTNQuantization, GPTQ])
def test_layer_bits_with_a_format_parse_from_yaml(stage_class):
    """LightningCLI checks ``init_args`` against the signature's type hints: ``layer_bits``
    mixing a format and bits must pass them (it was typed ``dict[str, int]``, so the YAML of
    the docstring, ``{"mlp\\.down_proj": fp8}``, was refused before the stage was built)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(stage_class, "stage")
    config = parser.parse_string(
        'stage: {format: nvfp4, layer_bits: {"mlp\\\\.down_proj": fp8, "q_proj": 16}}'
    )
    stage = parser.instantiate_classes(config).stage
    assert stage.layer_bits == {"mlp\\.down_proj": "fp8", "q_proj": 16}


def test_a_layer_the_format_cannot_hold_is_refused_with_the_fix_that_works():
    """A stem 24 wide cannot hold MXFP4's groups of 32: the error names the layer and both
    fixes, and each fix, as written in the message, compresses the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    before = state_copy(model)
    with pytest.raises(PPQConfigError, match=r"0 shape=\(32, 24\)") as error:
        RTNQuantization(format="mxfp4", targets=["."]).apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    message = str(error.value)
    assert "ignore=['^0$']" in message
    assert "layer_bits={'^0$': 'fp8'} (16: unquantized)" in message
    RTNQuantization(format="mxfp4", targets=["."], ignore=["^0$"]).apply(model)
    assert get_state(model[0]) is None and get_state(model[2]).grid_format == "mxfp4"
    mixed = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 32))
    RTNQuantization(format="mxfp4", targets=["."], layer_bits={"^0$": "fp8"}).apply(mixed)
    assert [get_state(layer).grid_format for layer in mixed] == ["fp8", "mxfp4"]
    assert check_invariants(mixed) == 2


@pytest.mark.parametrize("order", ["P50>Q_nvfp4", "Q_nvfp4>P50"])
def test_a_schedule_orders_a_format_stage_like_any_q_stage(tmp_path, tiny_lm, tiny_data, order):
    from ppq_lightning.callbacks import CompressionSchedule
    from tests.helpers import make_trainer

    stages = [
        MagnitudePruning(sparsity=0.5, name="P50"),
        RTNQuantization(format="nvfp4", name="Q_nvfp4"),
    ]
    schedule = CompressionSchedule(stages=stages, order=order)
    make_trainer(tmp_path, [schedule]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    rows = schedule.rows()
    assert [r["stage"] for r in rows] == [
        "0_dense",
        *(f"{i}_{n}" for i, n in enumerate(order.split(">"), 1)),
    ]
    assert rows[-1]["nominal_C"] == pytest.approx(2 * 16 / 4)  # C_P * C_Q, B_Q = 4
    # stored sparse: half the values at 4 bits, a 1-bit mask, E4M3 scales: 0.5 bit per weight
    assert 16 / 3.6 < rows[-1]["measured_C"] < 16 / 3.4
    for module in resolve_targets(tiny_lm).values():
        state = get_state(module)
        assert state.grid_format == "nvfp4" and state.mask is not None
    check_invariants(tiny_lm)


def test_layers_the_format_cannot_hold_are_counted_in_the_refusal():
    """Every layer too narrow: the message says how many, and that a format they hold (or
    ignore / layer_bits) is the fix, instead of a one-layer fix that would only move on."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Linear(24, 24))
    with pytest.raises(PPQConfigError, match=r"2 of the 2 target layers cannot hold it \(0, 1\)"):
        RTNQuantization(format="mxfp4", targets=["."]).apply(model)
    assert get_state(model[0]) is None and get_state(model[1]) is None
