import json

import pytest
import torch

import ppq_lightning
from ppq_lightning import check_invariants
from ppq_lightning.callbacks import GPTQ, BlockRemoval, MagnitudePruning, RTNQuantization, SparseGPT
from ppq_lightning.compressed.state import compressed_modules, get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import load_pretrained
from ppq_lightning.export.compressed_tensors import SIDE_FILE
from ppq_lightning.ops.quant_grid import QuantGrid
from tests.export.fresh import fresh_logits
from tests.export.helpers import compressed_lm, logits
from tests.helpers import token_batches

SCHEMES = {  # label -> stages
    "sym4_channel": lambda: [RTNQuantization(bits=4, symmetric=True)],
    "asym4_g32": lambda: [RTNQuantization(bits=4, group_size=32)],
    "sym2_g32": lambda: [RTNQuantization(bits=2, group_size=32, symmetric=True)],
    "asym2_channel": lambda: [RTNQuantization(bits=2)],
    "sym8_g32": lambda: [GPTQ(bits=8, group_size=32, symmetric=True)],
    "asym8_channel": lambda: [RTNQuantization(bits=8)],
    "mixed_sym": lambda: [
        RTNQuantization(bits=4, group_size=32, symmetric=True, layer_bits={r"self_attn": 8})
    ],
    "mixed_asym": lambda: [RTNQuantization(bits=4, group_size=32, layer_bits={r"down_proj": 8})],
    "pruned_gptq": lambda: [
        SparseGPT(sparsity=0.5, name="P"),
        GPTQ(bits=4, group_size=32, symmetric=True, name="Q"),
    ],
}


def test_exports_reload_in_a_fresh_process_with_identical_logits(tmp_path):
    ids = token_batches(1)[0]
    expected, jobs, modules = {}, {}, {}
    for label, stages in SCHEMES.items():
        module = compressed_lm(*stages())
        folder = tmp_path / label
        manifest = ppq_lightning.export(module, "compressed-tensors", folder)
        assert manifest["format"] == "compressed-tensors" and (folder / "export.json").is_file()
        expected[label], modules[label] = logits(module, ids), module
        jobs[label + "/load_pretrained"] = (folder, "load_pretrained")
        jobs[label + "/transformers"] = (folder, "transformers")
        jobs[label + "/dequantize"] = (folder, "dequantize")
    got, errors = fresh_logits(tmp_path, jobs, ids)
    for label in SCHEMES:
        # ppq's loader: every grid, identical in float32
        assert torch.equal(got[label + "/load_pretrained"], expected[label]), label
        symmetric = all(s.symmetric for _, _, s in compressed_modules(modules[label].model))
        if symmetric:  # the plain transformers path works for symmetric grids
            assert torch.equal(got[label + "/transformers"], expected[label]), label
        else:  # upstream: zero points lack their packed shape on the meta device
            assert label + "/transformers" in errors, label
    # upstream: dequantize=True applies the first scheme to every layer
    assert "mixed_sym/dequantize" in errors
    assert torch.equal(got["sym4_channel/dequantize"], expected["sym4_channel"])


def test_opt_reloads_and_gpt2_conv1d_is_refused(tmp_path):
    ids = token_batches(1)[0]
    module = compressed_lm(RTNQuantization(bits=4, group_size=16), family="opt")
    ppq_lightning.export(module, "compressed-tensors", tmp_path / "opt")
    symmetric = compressed_lm(RTNQuantization(bits=8, symmetric=True), family="opt")
    ppq_lightning.export(symmetric, "compressed-tensors", tmp_path / "opt_sym")
    jobs = {
        "asym": (tmp_path / "opt", "load_pretrained"),
        "sym": (tmp_path / "opt_sym", "transformers"),
    }
    got, errors = fresh_logits(tmp_path, jobs, ids)
    assert not errors
    assert torch.equal(got["asym"], logits(module, ids))
    assert torch.equal(got["sym"], logits(symmetric, ids))
    gpt2 = compressed_lm(RTNQuantization(bits=4), family="gpt2")
    with pytest.raises(PPQConfigError, match=r"quantizes nn\.Linear layers, not Conv1D"):
        ppq_lightning.export(gpt2, "compressed-tensors", tmp_path / "gpt2")


def test_load_pretrained_restores_masks_grids_and_histories(tmp_path):
    module = compressed_lm(
        MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")
    )
    ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct")
    assert (tmp_path / "ct" / SIDE_FILE).is_file()
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert not config["quantization_config"].get("sparsity_config")  # no kernel vLLM lacks
    loaded = load_pretrained(tmp_path / "ct")
    assert check_invariants(loaded) == 14
    for name, layer, state in compressed_modules(module.model):
        other = get_state(loaded.get_submodule(name))
        assert torch.equal(other.mask, state.mask) and other.stages == state.stages
        assert torch.equal(other.scale, state.scale) and other.bits == 4
        assert torch.equal(loaded.get_submodule(name).weight, layer.weight)
        assert int((loaded.get_submodule(name).weight[~state.mask] != 0).sum()) == 0


def test_pruned_only_model_exports_exact_zeros(tmp_path):
    module = compressed_lm(MagnitudePruning(sparsity=0.5))
    ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct")
    loaded = load_pretrained(tmp_path / "ct")
    ids = token_batches(1)[0]
    assert torch.equal(loaded(ids).logits, logits(module, ids))
    assert check_invariants(loaded) == 14


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_dtype_rounds_the_grid_first(tmp_path, dtype):
    module = compressed_lm(GPTQ(bits=4, group_size=32))
    ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct", dtype=dtype)
    loaded = load_pretrained(tmp_path / "ct", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    for name, layer, state in compressed_modules(module.model):
        grid = state.grid
        rounded = QuantGrid(grid.scale.to(torch_dtype).float(), grid.zero, 4, 32, False)
        codes = rounded.quantize(layer.weight)
        assert torch.equal(codes, grid.quantize(layer.weight))  # the same codes
        expected = rounded.dequantize(codes).to(torch_dtype)  # the same model in that dtype
        assert torch.equal(loaded.get_submodule(name).weight, expected), name


def test_refusals_name_the_problem_and_write_nothing(tmp_path):
    target = tmp_path / "ct"
    with pytest.raises(PPQConfigError, match="bits=3"):
        ppq_lightning.export(compressed_lm(RTNQuantization(bits=3)), "compressed-tensors", target)
    with pytest.raises(PPQConfigError, match="structural edits"):
        module = compressed_lm(BlockRemoval(ratio=0.5, num_calibration_batches=1))
        ppq_lightning.export(module, "compressed-tensors", target)
    with pytest.raises(PPQConfigError, match="dtype"):
        ppq_lightning.export(
            compressed_lm(RTNQuantization(bits=4)), "compressed-tensors", target, dtype="int8"
        )
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_vllm_limits_warn_naming_the_layer(tmp_path):
    module = compressed_lm(RTNQuantization(bits=2, group_size=16))
    message = r"Marlin kernels do not take .* group size 16 .*: model\.layers\.0\.self_attn\.q_proj"
    with pytest.warns(UserWarning, match=message):
        ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct")
