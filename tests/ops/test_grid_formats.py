import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.float_grid import FloatGrid, float_storage
from ppq_lightning.ops.gptq import gptq
from ppq_lightning.ops.grid_formats import GRID_FORMATS, GridSpec, check_grid_format
from ppq_lightning.ops.kquants import KQuantGrid
from ppq_lightning.ops.quant_grid import QuantGrid
from ppq_lightning.ops.sparsegpt import sparsegpt

SHAPE = (128, 512)  # every format holds it: 128-row blocks, 256-column super-blocks


def _spec(format: str) -> GridSpec:
    return GridSpec.of(format, 4 if format == "int" else None)


def test_each_format_resolves_to_what_it_stores():
    assert GridSpec.of("nvfp4") == GridSpec("nvfp4", 4, 16, True)
    assert GridSpec.of("MXFP4") == GridSpec("mxfp4", 4, 32, True)
    assert GridSpec.of("fp8") == GridSpec("fp8", 8, None, True)
    assert GridSpec.of("fp8_block") == GridSpec("fp8_block", 8, 128, True)
    assert GridSpec.of("q4_k") == GridSpec("Q4_K", 4, 32, False)
    assert GridSpec.of("Q6_K") == GridSpec("Q6_K", 6, 16, True)
    assert GridSpec.of("int", 4) == GridSpec("int", 4, None, False)
    assert GridSpec.of("nvfp4", bits=4, group_size=16, symmetric=True) == GridSpec.of("nvfp4")
    assert check_grid_format("Q4_K_M") == "Q4_K_M"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"format": "nvfp4", "bits": 8},
            r"bits=8 is not allowed: expected 4 \(what format='nvfp4'",
        ),
        ({"format": "nvfp4", "symmetric": False}, r"symmetric=False .*format='nvfp4'"),
        ({"format": "mxfp4", "group_size": 16}, r"group_size=16 .*expected 32"),
        ({"format": "fp8", "group_size": 128}, r"group_size=128 .*expected None"),
        ({"format": "Q4_K", "symmetric": True}, r"symmetric=True .*format='Q4_K'"),
        ({"format": "int"}, r"bits=None .*format='int'"),
        ({"format": "int4", "bits": 4}, r"format='int4' .*one of int, nvfp4"),
        ({"format": "INT8"}, r"format='INT8' .*\(an integer grid: format='int' with bits=8\)"),
        ({"format": 4}, r"format=4 "),
    ],
)
def test_contradictions_and_unknown_formats_are_refused(arguments, message):
    with pytest.raises(PPQConfigError, match=message):
        GridSpec.of(**arguments)


@pytest.mark.parametrize(
    ("format", "shape", "message"),
    [
        ("nvfp4", (8, 24), r"divisible by 16 for nvfp4"),
        ("mxfp4", (8, 48), r"divisible by 32 for mxfp4"),
        ("fp8_block", (64, 128), r"rows divisible by 128"),
        ("Q4_K", (8, 576), r"multiple of 256"),
    ],
)
def test_shapes_a_format_cannot_hold_are_refused_naming_the_layer(format, shape, message):
    with pytest.raises(PPQConfigError, match=message) as error:
        GridSpec.of(format).check_shape(shape, "model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in str(error.value)


@pytest.mark.parametrize("format", GRID_FORMATS)
def test_round_in_place_equals_the_grid_of_the_weight(format):
    torch.manual_seed(0)
    w = torch.randn(SHAPE)
    spec = _spec(format)
    expected = spec.compute(w).fake_quantize(w)
    rounded = w.clone()
    grid, error = spec.round_(rounded, rows=48)  # fp8_block: whole 128-row blocks
    assert torch.equal(rounded, expected)
    assert error == pytest.approx(float((expected - w).pow(2).sum() / w.pow(2).sum()), rel=1e-5)
    kind = QuantGrid if format == "int" else KQuantGrid if format.startswith("Q") else FloatGrid
    assert isinstance(grid, kind)


@pytest.mark.parametrize("format", GRID_FORMATS)
def test_gptq_on_an_identity_hessian_equals_rtn(format):
    """With H = I no column's error reaches another: GPTQ rounds every weight to its nearest
    level, on every grid kind."""
    torch.manual_seed(1)
    w = torch.randn(SHAPE)
    grid = _spec(format).compute(w)
    result = gptq(w, torch.eye(SHAPE[1]), 4, grid=grid)
    assert torch.equal(result.weight, grid.fake_quantize(w))
    assert result.grid is not None and type(result.grid) is type(grid)


@pytest.mark.parametrize("format", ["nvfp4", "mxfp4", "fp8", "Q4_K", "Q6_K"])
def test_gptq_error_feedback_stays_on_the_grid_and_keeps_zeros(format):
    torch.manual_seed(2)
    w = torch.randn(SHAPE)
    x = torch.randn(1024, SHAPE[1])
    h = 2 * x.T @ x / 1024
    mask = torch.rand(SHAPE) > 0.5
    w = w * mask
    grid = _spec(format).compute(w)
    result = gptq(w, h, 4, mask=mask, grid=grid)
    assert torch.equal(result.weight, grid.fake_quantize(result.weight))  # on the grid
    assert torch.all(result.weight[~mask] == 0)
    rtn = grid.fake_quantize(w)
    output_error = ((result.weight - w) @ x.T).pow(2).sum()
    assert output_error < ((rtn - w) @ x.T).pow(2).sum()  # the feedback helps


@pytest.mark.parametrize("format", ["nvfp4", "fp8", "Q4_K"])
def test_sparsegpt_prunes_onto_a_fixed_format_grid(format):
    torch.manual_seed(3)
    w = torch.randn(SHAPE)
    x = torch.randn(1024, SHAPE[1])
    grid = _spec(format).compute(w)
    result = sparsegpt(w, 2 * x.T @ x / 1024, sparsity=0.5, grid=grid)
    assert torch.equal(result.weight, grid.fake_quantize(result.weight))
    assert float((result.weight == 0).float().mean()) >= 0.5
    assert result.grid is not None and type(result.grid) is type(grid)


def test_storage_counts_scales_at_their_real_width():
    rows, cols = SHAPE
    numel = rows * cols
    assert GridSpec.of("int", 4).storage(rows, cols).overhead_bits == rows * (16 + 4)
    assert GridSpec.of("nvfp4").storage(rows, cols).total_bits == numel * 4.5 + 32
    assert GridSpec.of("mxfp4").storage(rows, cols).total_bits == numel * 4.25
    assert GridSpec.of("fp8").storage(rows, cols).total_bits == numel * 8 + rows * 32
    assert GridSpec.of("Q4_K").storage(rows, cols).total_bits == numel * 4.5
    assert GridSpec.of("Q6_K").storage(rows, cols).total_bits == numel * 6.5625
    for format in GRID_FORMATS:  # what a computed grid counts is what the spec predicts
        spec = _spec(format)
        grid = spec.compute(torch.randn(SHAPE))
        assert grid.overhead_bits() == spec.storage(rows, cols).overhead_bits, format
    nvfp4 = GridSpec.of("nvfp4").compute(torch.randn(SHAPE))
    assert isinstance(nvfp4, FloatGrid)
    assert nvfp4.overhead_bits() == float_storage("nvfp4", rows, cols).overhead_bits


@pytest.mark.parametrize("format", GRID_FORMATS)
def test_select_rows_and_concat_give_back_the_grid(format):
    torch.manual_seed(4)
    w = torch.randn(256, 512)
    grid = _spec(format).compute(w)
    top, bottom = grid.select_rows(slice(0, 128)), grid.select_rows(slice(128, 256))
    joined = type(grid).concat([top, bottom])
    assert torch.equal(joined.fake_quantize(w), grid.fake_quantize(w))


def test_gguf_legacy_block_names_are_integer_grids_in_groups_of_32():
    assert GridSpec.of("Q4_0") == GridSpec("int", 4, 32, True)
    assert GridSpec.of("q4_1") == GridSpec("int", 4, 32, False)
    assert GridSpec.of("Q5_0") == GridSpec("int", 5, 32, True)
    assert GridSpec.of("Q8_0", bits=8) == GridSpec("int", 8, 32, True)
    with pytest.raises(PPQConfigError, match=r"group_size=64 .*format='Q4_0'"):
        GridSpec.of("Q4_0", group_size=64)
