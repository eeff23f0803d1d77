import gguf
import numpy as np
import pytest
import torch

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.ops.kquants import (
    KINDS,
    LAYOUTS,
    KQuantGrid,
    compute_kquant_grid,
    pack_kquant,
    q4_k_m_types,
    unpack_kquant,
    zero_exact,
)
from ppq_lightning.ops.quant_grid import compute_grid


def _bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns (so -0.0 != 0.0 and NaN == NaN)."""
    array = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(array, dtype=np.float32).view(np.int32)


def _weights(seed: int) -> torch.Tensor:
    """Rows of different character: Gaussian, pruned, one-sided, tiny, all-zero, large."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 512, generator=g) * 0.02
    w[1] *= torch.rand(512, generator=g) > 0.5  # half pruned
    w[2] = w[2].abs()  # no negative values
    w[3] = -w[3].abs()  # no positive values
    w[4] *= 1e-6  # near fp16's subnormal super-scales
    w[5] = 0.0
    w[6] *= 300.0
    w[7, :256] = 0.0  # one zero super-block
    w[8, 5] = 4.0  # an outlier
    return w


def test_layouts_match_gguf_and_storage_bits():
    for kind in KINDS:
        block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)]
        assert block == 256 and LAYOUTS[kind].block_bytes == size
    grids = {k: compute_kquant_grid(torch.zeros(1, 256), k) for k in KINDS}
    assert [grids[k].storage_bits() for k in KINDS] == [4.5, 5.5, 6.5625]
    assert [(grids[k].bits, grids[k].group_size) for k in KINDS] == [(4, 32), (5, 32), (6, 16)]


def test_hand_computed_q4_k_super_block():
    # sub-block j holds the 16 levels s_j * (k - 8), k = 0..15, twice; s_j = 2**-8 * sc_j
    sc = torch.tensor([63.0, 55, 47, 39, 31, 23, 15, 7])
    k = torch.arange(16.0).repeat(2)
    w = (2.0**-8 * sc[:, None] * (k - 8)).reshape(1, 256)
    grid = compute_kquant_grid(w, "Q4_K")
    # d = max scale / 63 = 2**-8; the zero points 8 make every min sc_j * 8 * d: dmin = 8 * d
    # (g = 8, the only g dividing every 8 * sc_j within 63 * g) and m_j = sc_j
    assert grid.d.tolist() == [[2.0**-8]] and grid.dmin.tolist() == [[2.0**-5]]
    assert grid.sc[0].tolist() == sc.tolist() and grid.m[0].tolist() == sc.tolist()
    assert grid.zero[0].tolist() == [8.0] * 8
    assert torch.equal(grid.quantize(w)[0], k.repeat(8))
    assert torch.equal(grid.fake_quantize(w), w)
    block = pack_kquant(grid, grid.quantize(w))[0]
    # d = 2**-8 is fp16 0x1C00, dmin = 2**-5 is 0x2800 (little-endian)
    assert block[:4].tolist() == [0x00, 0x1C, 0x00, 0x28]
    # bytes 0-3: sc_j | (sc_{j+4} >> 4) << 6; 4-7 the same for m; 8-11 the low nibbles of j+4
    assert block[4:16].tolist() == [127, 119, 47, 39, 127, 119, 47, 39, 255, 119, 255, 119]
    # codes: byte l of run c holds sub-block 2c's code l (low) and 2c+1's (high)
    assert block[16:48].tolist() == [kk | (kk << 4) for kk in k.int().tolist()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gguf_dequantizer_reads_our_grid_bit_exact(kind, seed):
    w = _weights(seed)
    grid = compute_kquant_grid(w, kind)
    codes = grid.quantize(w)
    data = pack_kquant(grid, codes)
    assert data.dtype == np.uint8 and data.shape == (12, 2 * LAYOUTS[kind].block_bytes)
    decoded = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    assert np.array_equal(_bits(decoded), _bits(grid.fake_quantize(w)))
    back, back_codes = unpack_kquant(data, kind)
    assert torch.equal(back_codes, codes)
    for name in ("d", "dmin", "sc", "m"):
        assert torch.equal(getattr(back, name), getattr(grid, name)), name
    # the affine view GPTQ rounds with writes the same bits
    assert np.array_equal(_bits(grid.as_quant_grid().fake_quantize(w)), _bits(decoded))


@pytest.mark.parametrize("kind", KINDS)
def test_unpack_reads_llama_cpp_style_blocks_as_gguf_does(kind):
    # blocks with arbitrary bytes (llama.cpp's free mins, Q6_K's negative scales): the grid read
    # back decodes as gguf does, and repacks to the same bytes
    rng = np.random.default_rng(3)
    size = LAYOUTS[kind].block_bytes
    data = rng.integers(0, 256, size=(3, 2 * size), dtype=np.uint8)
    at = (208,) if kind == "Q6_K" else (0, 2)  # d (and dmin): finite, moderate fp16 values
    for block in range(2):
        for offset in at:
            start = block * size + offset
            data[:, start : start + 2] = np.array([0.01 + offset], np.float16).view(np.uint8)
    grid, codes = unpack_kquant(data, kind)
    decoded = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    assert np.array_equal(_bits(grid.dequantize(codes)), _bits(decoded))
    assert np.array_equal(pack_kquant(grid, codes), data)
    if kind != "Q6_K":
        assert not bool(zero_exact(grid).all())  # free mins: 0 is not a level everywhere
        with pytest.raises(PPQConfigError, match="0 is not a level"):
            grid.as_quant_grid()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_is_a_level_and_pruned_weights_stay_zero(kind):
    w = _weights(4)
    grid = compute_kquant_grid(w, kind)
    assert bool(zero_exact(grid).all())
    out = grid.fake_quantize(w)
    pruned = w == 0
    assert pruned.any() and np.all(_bits(out[pruned]) == 0)  # +0.0, not -0.0
    assert np.all(_bits(grid.fake_quantize(torch.zeros_like(w))) == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_fake_quantize_is_idempotent_and_16_bit_weights_read_back(kind):
    w = _weights(5)
    grid = compute_kquant_grid(w, kind)
    once = grid.fake_quantize(w)
    assert torch.equal(grid.fake_quantize(once), once)
    assert torch.equal(grid.quantize(once), grid.quantize(w))
    assert float(grid.off_grid_distance(once).max()) == 0.0
    column = 300
    assert torch.equal(grid.round_column(w[:, column], column), once[:, column])
    codes = grid.quantize(w)
    for dtype in (torch.bfloat16, torch.float16):
        held = grid.held(codes, dtype)
        assert bool(grid.on_grid(held).all())
        distinct = held.float().abs() > 2**-14  # fp16 keeps these levels apart from neighbours
        assert torch.equal(grid.codes(held)[distinct], codes[distinct])
    off = once.to(torch.bfloat16) + torch.where(once == 0, 0.01, 0.0).to(torch.bfloat16)
    assert not bool(grid.on_grid(off).all())
    moved = grid.to("cpu")
    assert isinstance(moved, KQuantGrid) and torch.equal(moved.fake_quantize(w), once)


def test_search_is_not_worse_than_the_plain_integer_grids():
    # the zero-exact scale search against min-max integer grids with float32 scales
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(6)) * 0.02

    def error(out: torch.Tensor) -> float:
        return float((out - w).pow(2).sum() / w.pow(2).sum())

    assert error(compute_kquant_grid(w, "Q4_K").fake_quantize(w)) <= error(
        compute_grid(w, 4, 32).fake_quantize(w)
    )
    assert error(compute_kquant_grid(w, "Q5_K").fake_quantize(w)) <= 1.02 * error(
        compute_grid(w, 5, 32).fake_quantize(w)
    )
    assert error(compute_kquant_grid(w, "Q6_K").fake_quantize(w)) <= error(
        compute_grid(w, 6, 16, symmetric=True).fake_quantize(w)
    )


def test_refusals():
    with pytest.raises(PPQConfigError, match=r"w\.shape=\(4, 300\).*multiple of 256"):
        compute_kquant_grid(torch.zeros(4, 300), "Q4_K")
    with pytest.raises(PPQConfigError, match=r"w\.shape=\(256,\)"):
        compute_kquant_grid(torch.zeros(256), "Q4_K")
    with pytest.raises(PPQConfigError, match=r"kind='Q3_K'.*Q4_K, Q5_K, Q6_K"):
        compute_kquant_grid(torch.zeros(1, 256), "Q3_K")
    w = torch.zeros(1, 256)
    w[0, 3] = float("nan")
    with pytest.raises(PPQConfigError, match=r"w=.*inf or NaN.*finite"):
        compute_kquant_grid(w, "Q6_K")
    with pytest.raises(PPQConfigError, match=r"too large.*fp16 d"):
        compute_kquant_grid(torch.full((1, 256), 1e9), "Q4_K")
    grid = compute_kquant_grid(torch.randn(2, 256), "Q5_K")
    with pytest.raises(PPQConfigError, match=r"codes=.*integers 0\.\.31"):
        pack_kquant(grid, torch.full((2, 256), 32.0))
    with pytest.raises(PPQConfigError, match=r"codes\.shape=\(2, 512\)"):
        pack_kquant(grid, torch.zeros(2, 512))
    with pytest.raises(PPQConfigError, match=r"grid\.sc=.*integers 0\.\.63"):
        pack_kquant(KQuantGrid("Q4_K", grid.d, grid.dmin, grid.sc + 64, grid.m), grid.sc)
    with pytest.raises(PPQConfigError, match=r"grid\.d=.*fp16"):
        pack_kquant(KQuantGrid("Q5_K", grid.d + 1e-7, grid.dmin, grid.sc, grid.m), grid.sc)
    with pytest.raises(PPQConfigError, match=r"data=.*whole Q6_K blocks of 210 bytes"):
        unpack_kquant(np.zeros((2, 200), dtype=np.uint8), "Q6_K")
    with pytest.raises(PPQConfigError, match=r"w\.dtype=torch\.float32.*16-bit"):
        grid.on_grid(torch.zeros(2, 256))
    with pytest.raises(PPQConfigError, match=r"w\.shape\[1\]=512"):
        grid.quantize(torch.zeros(2, 512))
    with pytest.raises(PPQConfigError, match=r"tensor_names=.*list of GGUF tensor names"):
        q4_k_m_types("blk.0.attn_v.weight", 1)
    with pytest.raises(PPQConfigError, match="n_layers=0"):
        q4_k_m_types(["output.weight"], 0)
    with pytest.raises(PPQConfigError, match=r"3 ffn_down tensors.*mixture-of-experts"):
        q4_k_m_types([f"blk.{i}.ffn_down.weight" for i in range(3)], 2)
    with pytest.raises(PPQConfigError, match="duplicate"):
        q4_k_m_types(["output.weight", "output.weight"], 1)


def _llama_names(n_layers: int, tied: bool) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(n_layers):
        names += [
            f"blk.{i}.attn_norm.weight",
            f"blk.{i}.attn_q.weight",
            f"blk.{i}.attn_k.weight",
            f"blk.{i}.attn_v.weight",
            f"blk.{i}.attn_output.weight",
            f"blk.{i}.ffn_norm.weight",
            f"blk.{i}.ffn_gate.weight",
            f"blk.{i}.ffn_up.weight",
            f"blk.{i}.ffn_down.weight",
        ]
    return names + ["output_norm.weight"] + ([] if tied else ["output.weight"])


def test_q4_k_m_mixture_on_a_32_layer_llama():
    types = q4_k_m_types(_llama_names(32, tied=False), 32)
    # llama.cpp's use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        wanted = "Q6_K" if i in more else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == wanted, i
        assert types[f"blk.{i}.ffn_down.weight"] == wanted, i
        for short in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{short}.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] is None
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output_norm.weight"] is None
    # tied embeddings (no output.weight): the token embedding is quantized as the output
    assert q4_k_m_types(_llama_names(32, tied=True), 32)["token_embd.weight"] == "Q6_K"
    # shapes a super-block does not divide fall back as llama.cpp does
    columns = {"blk.1.ffn_down.weight": 1056, "blk.0.ffn_up.weight": 96}
    columns.update({"blk.1.attn_q.weight": 100, "output.weight": 100})
    fallback = q4_k_m_types(_llama_names(2, tied=False), 2, columns=columns)
    assert fallback["blk.1.ffn_down.weight"] == "Q8_0"  # use_more_bits(1, 2): Q6_K
    assert fallback["blk.0.ffn_up.weight"] == "Q5_0"
    assert fallback["blk.1.attn_q.weight"] == "F16"  # 32 does not divide 100 either
    assert fallback["output.weight"] == "Q8_0"
    big = q4_k_m_types(_llama_names(80, tied=False), 80, large_70b=True)
    assert big["blk.11.attn_v.weight"] == "Q5_K" and big["blk.12.attn_v.weight"] == "Q6_K"
