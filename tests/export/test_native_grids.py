"""The native format holds floating-point and K-quant grids bit for bit (issue #29)."""

import json

import pytest
import torch

import ppq_lightning
from ppq_lightning import check_invariants
from ppq_lightning.compressed.state import compressed_modules, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import load_compressed
from ppq_lightning.export.native import WEIGHTS, _bits_equal
from tests.export.grids import grid_lm
from tests.helpers import token_batches

FORMATS = ("nvfp4", "mxfp4", "fp8", "fp8_block", "Q4_K", "Q5_K", "Q6_K")
BUFFERS = ("scale", "zero", "global_scale", "d", "dmin", "sc", "m", "mask_bits")


def assert_same_states(module, loaded):
    for name, layer, state in compressed_modules(module.model):
        other = get_state(loaded.model.get_submodule(name))
        assert other.grid_format == state.grid_format, name
        assert other.grid_shape == state.grid_shape and other.bits == state.bits, name
        for buffer in BUFFERS:
            mine, theirs = getattr(state, buffer), getattr(other, buffer)
            assert (mine is None) == (theirs is None), (name, buffer)
            if mine is not None:
                assert _bits_equal(mine, theirs), (name, buffer)
        assert _bits_equal(loaded.model.get_submodule(name).weight, layer.weight), name
        assert type(other.grid) is type(state.grid), name


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("grid_format", FORMATS)
def test_every_grid_kind_round_trips_bit_identical(tmp_path, grid_format, sparsity):
    module = grid_lm(grid_format, sparsity=sparsity)
    manifest = ppq_lightning.export(module, "ppq", tmp_path / "out")
    assert manifest["weight_encodings"] == {"codes": 14, "values": 0, "dense": 0}
    loaded = load_compressed(tmp_path / "out")
    assert_same_states(module, loaded)
    assert check_invariants(loaded) == 14
    ids = token_batches(1)[0]
    assert torch.equal(loaded(ids), module(ids))
    metadata = _metadata(tmp_path / "out")
    bits = {4 if grid_format in ("nvfp4", "mxfp4", "Q4_K") else None, 5, 6, 8}
    records = [r for k, r in metadata["encodings"].items() if k.endswith("proj.weight")]
    assert all(r["encoding"] == "codes" and r["bits"] in bits for r in records)
    # pruned layers store only their kept codes (zero: code 0 on FP grids, z on K-quants)
    assert all(r["sparse"] for r in records) == (sparsity > 0)


def test_codes_are_packed_at_the_formats_width(tmp_path):
    sizes = {}
    for grid_format in ("nvfp4", "fp8", "Q4_K", "Q5_K", "Q6_K"):
        module = grid_lm(grid_format)
        ppq_lightning.export(module, "ppq", tmp_path / grid_format)
        from safetensors import safe_open

        with safe_open(str(tmp_path / grid_format / WEIGHTS), "pt") as handle:
            weight = handle.get_tensor("model.model.layers.0.mlp.down_proj.weight")
        sizes[grid_format] = weight.numel()
    n = 256 * 512
    assert sizes == {
        "nvfp4": n // 2,
        "fp8": n,
        "Q4_K": n // 2,
        "Q5_K": n * 5 // 8,
        "Q6_K": n * 6 // 8,
    }


def test_scales_are_stored_at_their_width(tmp_path):
    module = grid_lm({"q_proj": "nvfp4", "k_proj": "mxfp4", "v_proj": "Q4_K", ".": "Q6_K"})
    ppq_lightning.export(module, "ppq", tmp_path / "out")
    encodings = _metadata(tmp_path / "out")["encodings"]
    layer = "model.model.layers.0.self_attn."
    assert encodings[layer + "q_proj.ppq_state.scale"]["encoding"] == "e4m3"
    assert encodings[layer + "k_proj.ppq_state.scale"]["encoding"] == "e8m0"
    assert encodings[layer + "v_proj.ppq_state.d"]["encoding"] == "fp16"
    assert encodings[layer + "v_proj.ppq_state.sc"]["bits"] == 6
    assert encodings[layer + "o_proj.ppq_state.sc"]["bits"] == 8
    assert_same_states(module, load_compressed(tmp_path / "out"))


def test_a_grid_whose_buffers_do_not_fit_the_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    module = grid_lm("Q4_K")
    ppq_lightning.export(module, "ppq", tmp_path / "out")
    file = tmp_path / "out" / WEIGHTS
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        raw = handle.metadata()
    tensors = load_file(str(file))
    key = "model.model.layers.0.mlp.up_proj.ppq_state.d"
    tensors[key] = tensors[key][:, :0].contiguous()  # a grid of no super-blocks
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, str(crafted), metadata=raw)
    with pytest.raises(PPQConfigError, match=r"up_proj.weight' of shape \[512, 256\] has a Q4_K"):
        load_compressed(crafted)


def _metadata(folder):
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), "pt") as handle:
        return json.loads(handle.metadata()["ppq"])
