"""FloatGrid (NVFP4, MXFP4, FP8 per channel and per block) against hand-computed groups, brute
force over the levels, compressed-tensors' own quantizers and compressors, and refusals."""

import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.float_formats import E2M1_MAGNITUDES, e4m3_value
from ppq_lightning.ops.float_grid import (
    FLOAT_FORMATS,
    FloatGrid,
    compute_float_grid,
    float_storage,
    round_to_float_grid_,
)

SHAPES = {"nvfp4": (8, 64), "mxfp4": (8, 64), "fp8": (8, 64), "fp8_block": (256, 256)}


def _weight(format, seed=0, scale=0.02):
    torch.manual_seed(seed)
    return torch.randn(SHAPES[format]) * scale


def _element_scale(grid):
    """Each weight's scale, rebuilt from the grid's stored scales independently of the grid."""
    cols = grid.shape[1]
    scale = grid.scale
    if grid.format == "fp8_block":
        scale = scale.repeat_interleave(128, dim=0)
    if grid.global_scale is not None:
        scale = scale / grid.global_scale
    return scale.repeat_interleave(cols // scale.shape[1], dim=1)


def _levels(grid):
    if grid.element == "e2m1":
        positive = torch.tensor(E2M1_MAGNITUDES)
    else:
        positive = e4m3_value(torch.arange(0, 0x7F))
    return torch.cat([-positive.flip(0)[:-1], positive])


# -- hand-computed groups ------------------------------------------------------------------


def test_nvfp4_groups_by_hand():
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([3.0, -1.0, 0.26, -0.6])
    w[1, :3] = torch.tensor([1.1, -0.5, 0.05])
    w[1, 16] = 1e-4  # a tiny group: its scale is an E4M3 subnormal-range value
    grid = compute_float_grid(w, "nvfp4")
    # global scale 448 * 6 / amax = 2688 / 3 = 896
    assert grid.global_scale.tolist() == [896.0]
    # group scales: round_to_e4m3(amax / 6 * 896): 3 -> 448; 1.1 -> 164.27 -> 160 (step 16);
    # 1e-4 -> 0.01493 -> 2**-6 (between 7 * 2**-9 and 2**-6); an all-zero group -> 0.125
    assert grid.scale.tolist() == [[448.0, 0.125], [160.0, 2.0**-6]]
    fq = grid.fake_quantize(w)
    # row 0: weight scale 448 / 896 = 0.5: 3 / 0.5 = 6 -> 6; -2 -> -2; 0.52 -> 0.5; -1.2 -> -1
    assert fq[0, :4].tolist() == [3.0, -1.0, 0.25, -0.5]
    # row 1: weight scale s = 160 / 896: 1.1 / s = 6.16 -> 6; -0.5 / s = -2.8 -> -3;
    # 0.05 / s = 0.28 -> 0.5
    s = torch.tensor(160.0) / torch.tensor(896.0)
    assert torch.equal(fq[1, :3], torch.tensor([6.0, -3.0, 0.5]) * s)
    # the tiny group: 1e-4 / (2**-6 / 896) = 5.73 -> 6
    assert torch.equal(fq[1, 16], 6.0 * (torch.tensor(2.0**-6) / torch.tensor(896.0)))
    assert grid.quantize(w)[0, :4].tolist() == [7, 12, 1, 10]  # 6, -2, 0.5, -1
    assert torch.equal(fq[0, 4:], torch.zeros(28))


def test_mxfp4_blocks_by_hand():
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([5.0, 2.6, -0.2, 0.75])
    w[0, 32:35] = torch.tensor([0.9, 0.3, -0.06])
    grid = compute_float_grid(w, "mxfp4")
    # block 1: amax 5, floor(log2 5) - 2 = 0: scale 1; block 2: amax 0.9, -1 - 2 = -3: 1/8
    assert grid.scale.tolist() == [[1.0, 0.125]]
    assert grid.global_scale is None
    fq = grid.fake_quantize(w)
    # 5 -> 4 (tie to even), 2.6 -> 3, -0.2 -> 0, 0.75 -> 1 (tie to even)
    assert fq[0, :4].tolist() == [4.0, 3.0, 0.0, 1.0]
    # 0.9 * 8 = 7.2 saturates to 6 (the OCP rule clips the top of a block whose amax has a
    # significand of 1.75 or more); 2.4 -> 2; -0.48 -> -0.5
    assert fq[0, 32:35].tolist() == [0.75, 0.25, -0.0625]
    assert grid.quantize(w)[0, 32:35].tolist() == [7, 4, 9]


def test_fp8_rows_by_hand():
    w = torch.zeros(3, 8)
    w[0, :6] = torch.tensor([448.0, 100.0, 17.0, 2.0**-10, -3 * 2.0**-10, -0.0])
    w[1, :2] = torch.tensor([0.875, 0.01])
    grid = compute_float_grid(w, "fp8")
    # one scale per row: amax / 448: 1; 0.875 / 448 = 2**-9; an all-zero row: float32 eps
    assert grid.scale.tolist() == [[1.0], [2.0**-9], [2.0**-23]]
    fq = grid.fake_quantize(w)
    # ties to even (100 -> 96, 17 -> 16, 2**-10 -> 0), a subnormal tie 1.5 * 2**-9 -> 2**-8
    assert fq[0, :6].tolist() == [448.0, 96.0, 16.0, 0.0, -(2.0**-8), 0.0]
    # 0.01 / 2**-9 = 5.12 -> 5 (step 0.5 in [4, 8))
    assert fq[1, :2].tolist() == [0.875, 5 * 2.0**-9]
    assert grid.quantize(w)[0, :2].tolist() == [0x7E, 0x6C]  # 448, 96


def test_fp8_block_scales_are_per_128_by_128_block():
    w = torch.zeros(256, 256)
    w[0, 0], w[5, 200], w[130, 3] = 4.48, -8.96, 448.0  # block (1, 1) stays zero
    grid = compute_float_grid(w, "fp8_block")
    expected = torch.tensor([[4.48, 8.96], [448.0, 0.0]]) / 448.0
    expected[1, 1] = 2.0**-23
    assert torch.equal(grid.scale, expected)
    fq = grid.fake_quantize(w)
    assert fq[0, 0] == w[0, 0] and fq[5, 200] == w[5, 200] and fq[130, 3] == 448.0
    assert torch.count_nonzero(fq) == 3


# -- every format: brute force, idempotence, zero --------------------------------------------


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_fake_quantize_is_the_nearest_level_times_its_scale(format):
    w = _weight(format)
    w[0, :5] *= 40  # a few outliers
    grid = compute_float_grid(w, format)
    fq = grid.fake_quantize(w)
    scale = _element_scale(grid)
    candidates = _levels(grid)[None, None, :] * scale[..., None]  # (rows, cols, levels)
    assert (candidates == fq[..., None]).any(dim=-1).all()  # a level times its scale, exactly
    nearest = (candidates - w[..., None]).abs().min(dim=-1).values
    assert torch.allclose((fq - w).abs(), nearest, rtol=1e-6, atol=0)
    assert torch.equal(grid.dequantize(grid.quantize(w)), fq)
    assert torch.equal(grid.fake_quantize(fq), fq)  # idempotent
    assert grid.off_grid_distance(fq).max() < 1e-5
    assert torch.isfinite(fq).all()


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_off_grid_distance_is_in_units_of_the_local_spacing(format):
    w = _weight(format)
    grid = compute_float_grid(w, format)
    scale = _element_scale(grid)
    levels = _levels(grid)
    # a weight a third of the way from a level to the next one up
    code = grid.quantize(w)
    fq = grid.fake_quantize(w)
    index = (levels - (fq / scale)[..., None]).abs().argmin(dim=-1)  # the level of each
    inside = index < levels.numel() - 1
    upper = levels[index.clamp(max=levels.numel() - 2) + 1] * scale
    probe = torch.where(inside, fq + (upper - fq) / 3, fq)
    distance = grid.off_grid_distance(probe)
    assert torch.allclose(distance[inside], torch.full_like(distance[inside], 1 / 3), atol=1e-4)
    assert torch.equal(grid.quantize(fq), code)
    if format != "mxfp4":  # fp8 and nvfp4 scales map each group's amax within the range
        assert grid.off_grid_distance(w).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_zero_stays_exactly_zero(format):
    w = _weight(format)
    w[:, ::2] = 0.0
    w[0, 1] = -0.0
    grid = compute_float_grid(w, format)
    assert torch.isfinite(grid.scale).all() and (grid.scale > 0).all()
    q = grid.quantize(w)
    zero = w == 0
    assert torch.equal(q[zero], torch.zeros(int(zero.sum())))  # code 0, never -0's code
    fq = grid.fake_quantize(w)
    assert (fq[zero] == 0).all() and not torch.signbit(fq[zero]).any()
    empty = compute_float_grid(torch.zeros(SHAPES[format]), format)
    assert torch.isfinite(empty.scale).all() and (empty.scale > 0).all()
    assert torch.equal(
        empty.fake_quantize(torch.zeros(SHAPES[format])), torch.zeros(SHAPES[format])
    )
    if empty.global_scale is not None:
        assert empty.global_scale.tolist() == [1.0]


@pytest.mark.parametrize("format", FLOAT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_held_on_the_grid(format, dtype):
    w = _weight(format).to(dtype)
    grid = compute_float_grid(w, format)
    q = grid.quantize(w)
    held = grid.held(q, dtype)
    assert held.dtype == dtype
    assert grid.on_grid(held).all()
    assert torch.equal(grid.codes(held), q)
    off = held.clone()
    off[0, 0] = (held[0, 0].float() * 1.03 + 1e-6).to(dtype)  # levels are 6 % or more apart
    assert not grid.on_grid(off)[0, 0] and grid.on_grid(off)[0, 1:].all()
    with pytest.raises(PPQConfigError, match=r"w\.dtype"):
        grid.on_grid(held.float())


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_rows_decided_a_slice_at_a_time_equal_the_whole_matrix(format):
    w = torch.randn(384, 256)
    whole = compute_float_grid(w, format, rows=4096)
    sliced = compute_float_grid(w, format, rows=100)  # 128 for fp8_block
    assert torch.equal(whole.scale, sliced.scale)
    rounded = w.clone().bfloat16()
    grid, error = round_to_float_grid_(rounded, format, rows=100)
    assert torch.equal(grid.scale, compute_float_grid(w.bfloat16(), format).scale)
    assert torch.equal(rounded, grid.held(grid.quantize(w.bfloat16()), torch.bfloat16))
    assert 0 < error < 0.05


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_round_column_is_one_column_of_fake_quantize(format):
    w = _weight(format)
    grid = compute_float_grid(w, format)
    fq = grid.fake_quantize(w)
    for column in (0, 17, w.shape[1] - 1):
        assert torch.equal(grid.round_column(w[:, column], column), fq[:, column])
        assert torch.equal(grid.column_scale(column), _element_scale(grid)[:, column])


def test_grid_attributes_and_storage():
    expected = {
        "nvfp4": (4, 16, 4 + 8 / 16 + 32 / (8 * 64)),
        "mxfp4": (4, 32, 4 + 8 / 32),
        "fp8": (8, None, 8 + 32 / 64),
        "fp8_block": (8, 128, 8 + 32 / (128 * 128)),
    }
    for format, (bits, group_size, per_weight) in expected.items():
        grid = compute_float_grid(_weight(format), format)
        assert (grid.bits, grid.group_size, grid.symmetric, grid.format) == (
            bits,
            group_size,
            True,
            format,
        )
        assert grid.storage_bits() == pytest.approx(per_weight, rel=1e-12)
        moved = grid.to("cpu")
        assert torch.equal(moved.scale, grid.scale) and moved.format == format
    storage = float_storage("nvfp4", 4, 32)  # 128 values, 8 E4M3 scales, 1 global scale
    assert (storage.payload_bits, storage.overhead_bits) == (512.0, 8 * 8 + 32.0)


# -- compressed-tensors ----------------------------------------------------------------------


PRESETS = {"nvfp4": "NVFP4", "mxfp4": "MXFP4", "fp8": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}


def _ct_observer_scales(w, format, args):
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    rows, cols = w.shape
    global_scale = None
    if format == "nvfp4":
        global_scale = generate_gparam(w.min(), w.max())
        groups = w.reshape(rows, cols // 16, 16)
        low, high = groups.amin(2), groups.amax(2)
    elif format == "mxfp4":
        groups = w.reshape(rows, cols // 32, 32)
        low, high = groups.amin(2), groups.amax(2)
    elif format == "fp8":
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        blocks = w.reshape(rows // 128, 128, cols // 128, 128)
        low, high = blocks.amin((1, 3)), blocks.amax((1, 3))
    scale, zero = calculate_qparams(low, high, args, global_scale=global_scale)
    return scale.float(), zero, global_scale


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_equals_compressed_tensors_fake_quantize(format):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    w = _weight(format)
    w[1, :16] = 0.0  # an all-zero group
    args = preset_name_to_scheme(PRESETS[format], ["Linear"]).weights
    grid = compute_float_grid(w, format)
    scale, _, global_scale = _ct_observer_scales(w, format, args)
    if format == "mxfp4":
        # its observer rounds amax up to the next power of two from a significand of 1.75,
        # where the OCP rule this grid follows floors: exactly those scales are doubled
        significand, _ = torch.frexp(w.reshape(8, 2, 32).abs().amax(2))
        assert torch.equal(scale / grid.scale, torch.where(significand >= 0.875, 2.0, 1.0))
        scale = grid.scale  # decode with our scales
    else:
        assert torch.equal(scale, grid.scale)
        if global_scale is not None:
            assert torch.equal(global_scale, grid.global_scale)
    theirs = fake_quantize(w, scale, torch.zeros_like(scale), args, global_scale=global_scale)
    assert torch.equal(theirs.float(), grid.fake_quantize(w))


@pytest.mark.parametrize("format", FLOAT_FORMATS)
def test_compressed_tensors_decompresses_our_codes(format):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import preset_name_to_scheme

    w = _weight(format).bfloat16()
    grid = compute_float_grid(w, format)
    q = grid.quantize(w)
    scheme = preset_name_to_scheme(PRESETS[format], ["Linear"])
    state = {"weight": w, "weight_scale": grid.scale}
    if grid.global_scale is not None:
        state["weight_global_scale"] = grid.global_scale
    compressor = {
        "nvfp4": NVFP4PackedCompressor,
        "mxfp4": MXFP4PackedCompressor,
    }.get(format, NaiveQuantizationCompressor)
    packed = compressor.compress(state, scheme)
    if grid.element == "e2m1":
        rows, cols = grid.shape
        values = unpack_fp4_from_uint8(packed["weight_packed"], rows, cols, dtype=torch.float32)
        assert torch.equal(values, grid._element_values(q))  # the stored codes are ours
    else:
        assert packed["weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(packed["weight"].float(), grid._element_values(q))
    decoded = compressor.decompress(packed, scheme)["weight"]
    assert torch.equal(decoded.to(torch.bfloat16), grid.held(q, torch.bfloat16))


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["nvfp8", "NVFP4", "int4", None, 4])
def test_unknown_format_is_refused(format):
    with pytest.raises(PPQConfigError, match=r"format=.*nvfp4, mxfp4, fp8, fp8_block"):
        compute_float_grid(torch.randn(4, 64), format)


@pytest.mark.parametrize(
    ("shape", "format", "match"),
    [
        ((4, 24), "nvfp4", r"w.shape=\(4, 24\).*divisible by 16 for nvfp4; 24 columns"),
        ((4, 48), "mxfp4", r"w.shape=\(4, 48\).*divisible by 32 for mxfp4; 48 columns"),
        ((100, 256), "fp8_block", r"rows divisible by 128 for fp8_block.*100 rows are not"),
        ((128, 200), "fp8_block", r"columns .*divisible by 128 for fp8_block; 200 columns"),
        ((2, 4, 16), "nvfp4", r"w.shape=\(2, 4, 16\).*2-D weight matrix"),
        ((64,), "fp8", r"w.shape=\(64,\).*2-D weight matrix"),
        ((0, 64), "fp8", r"non-empty"),
    ],
)
def test_shapes_the_format_cannot_hold_are_refused(shape, format, match):
    with pytest.raises(PPQConfigError, match=match):
        compute_float_grid(torch.randn(shape), format)


def test_other_refusals_before_any_change():
    w = torch.randn(4, 24)
    before = w.clone()
    with pytest.raises(PPQConfigError, match="divisible by 16"):
        round_to_float_grid_(w, "nvfp4")
    assert torch.equal(w, before)
    with pytest.raises(PPQConfigError, match=r"w\.dtype"):
        compute_float_grid(torch.ones(4, 32, dtype=torch.int32), "mxfp4")
    with pytest.raises(PPQConfigError, match="rows=0"):
        compute_float_grid(torch.randn(4, 32), "mxfp4", rows=0)
    grid = compute_float_grid(torch.randn(4, 32), "nvfp4")
    with pytest.raises(PPQConfigError, match=r"w.shape=\(4, 16\).*\(4, 32\)"):
        grid.quantize(torch.randn(4, 16))
    with pytest.raises(PPQConfigError, match="global_scale"):
        FloatGrid(grid.scale, None, "nvfp4", (4, 32))
    with pytest.raises(PPQConfigError, match=r"\(rows, cols\)"):
        float_storage("fp8_block", 100, 128)
