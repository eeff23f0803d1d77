"""compressed-tensors export of floating-point grids (issue #29): nvfp4-pack-quantized,
mxfp4-pack-quantized and float-quantized (FP8), loaded in a fresh process."""

import copy
import json

import pytest
import torch

import ppq_lightning
from ppq_lightning import check_invariants
from ppq_lightning.compressed.state import compressed_modules, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import load_pretrained
from tests.export.fresh import fresh_logits
from tests.export.grids import grid_lm
from tests.helpers import token_batches

FORMATS = {  # our grid -> compressed-tensors' format
    "nvfp4": "nvfp4-pack-quantized",
    "mxfp4": "mxfp4-pack-quantized",
    "fp8": "float-quantized",
    "fp8_block": "float-quantized",
}
MIXED = {
    r"self_attn\.(q|k)_proj$": "nvfp4",
    r"self_attn\.v_proj$": "mxfp4",
    r"self_attn\.o_proj$": {"format": "int", "bits": 4, "group_size": 32, "symmetric": True},
    r"mlp\.(gate|up)_proj$": "fp8",
    r"down_proj$": "fp8_block",
}


def test_fp_grids_reload_in_a_fresh_process(tmp_path):
    ids = token_batches(1)[0]
    modules, jobs = {}, {}
    for label, formats in {**{f: f for f in FORMATS}, "mixed": MIXED}.items():
        modules[label] = grid_lm(formats, sparsity=0.5)
        ppq_lightning.export(modules[label], "compressed-tensors", tmp_path / label)
        for mode in ("load_pretrained", "transformers", "transformers-bfloat16"):
            jobs[f"{label}/{mode}"] = (tmp_path / label, mode)
    got, errors = fresh_logits(tmp_path, jobs, ids)
    for label, module in modules.items():
        expected = module.model(ids).logits
        # ppq's loader: every format, identical in float32
        assert torch.equal(got[f"{label}/load_pretrained"], expected), label
        if label.startswith("fp8"):  # transformers' default path: FP8 identical too
            assert torch.equal(got[f"{label}/transformers"], expected), label
        else:  # upstream (0.20.1): FP4 decompresses to bf16 weights, which a float32 model
            # refuses in its matmul
            assert "same dtype" in errors[f"{label}/transformers"], label
        # in bfloat16 it loads: each weight is the float32 grid value rounded once to bf16,
        # as our model holds it in bf16; the logits agree to bf16 arithmetic
        ours = copy.deepcopy(module.model).to(torch.bfloat16)(ids).logits.float()
        theirs = got[f"{label}/transformers-bfloat16"]
        assert (theirs - ours).abs().max() <= 2**-6 * ours.abs().max(), label
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    formats = sorted(group["format"] for group in config["config_groups"].values())
    assert formats == sorted(
        ["nvfp4-pack-quantized", "mxfp4-pack-quantized", "pack-quantized"] + ["float-quantized"] * 2
    )


@pytest.mark.parametrize("grid_format", list(FORMATS))
def test_the_file_holds_the_formats_tensors_and_the_side_file_the_grid(tmp_path, grid_format):
    from safetensors import safe_open

    module = grid_lm(grid_format)
    manifest = ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == FORMATS[grid_format]
    assert manifest["schemes"] == [{"format": grid_format, "layers": 14}]
    layer = "model.layers.0.mlp.down_proj"  # (256, 512)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(layer + ".")}  # noqa: SIM118
    grid = get_state(module.model.get_submodule(layer)).grid
    if grid_format in ("nvfp4", "mxfp4"):
        assert tensors[layer + ".weight_packed"].shape == (256, 256)  # two E2M1 per byte
        scale = tensors[layer + ".weight_scale"]
        assert scale.dtype == (torch.float8_e4m3fn if grid_format == "nvfp4" else torch.uint8)
        if grid_format == "nvfp4":
            assert torch.equal(scale.float(), grid.scale)
            assert torch.equal(tensors[layer + ".weight_global_scale"], grid.global_scale)
    else:
        assert tensors[layer + ".weight"].dtype == torch.float8_e4m3fn
        assert tensors[layer + ".weight_scale"].dtype == torch.float32
        assert torch.equal(tensors[layer + ".weight_scale"], grid.scale)
    loaded = load_pretrained(tmp_path / "ct")
    assert check_invariants(loaded) == 14
    for name, layer_module, state in compressed_modules(module.model):
        other = get_state(loaded.get_submodule(name))
        assert other.grid_format == grid_format and torch.equal(other.scale, state.scale)
        assert torch.equal(loaded.get_submodule(name).weight, layer_module.weight), name


def test_kquant_grids_are_refused_before_anything_is_written(tmp_path):
    module = grid_lm({r"layers\.1\.mlp\.up_proj$": "Q4_K", ".": "nvfp4"})
    with pytest.raises(
        PPQConfigError,
        match=r"layers\.1\.mlp\.up_proj: grid_format='Q4_K' \(a GGUF K-quant\) has no "
        r"compressed-tensors format.*use format='gguf'",
    ):
        ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []
