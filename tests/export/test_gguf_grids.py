"""GGUF export of K-quant, MXFP4 and Q5_0 grids (issue #29): block types decided by grid kind,
read back by gguf's own dequantizer and by transformers' GGUF loader."""

import re

import gguf
import numpy as np
import pytest
import torch

import ppq_lightning
from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export.gguf import FILE, _permute_rows, file_type
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.mixed_precision import gguf_names, q4_k_m_grids
from ppq_lightning.modules.views import weight_matrix
from tests.export.fresh import fresh_logits
from tests.export.grids import GRID_LLAMA, PROJECTIONS, grid_lm
from tests.helpers import token_batches

Q5_0, Q8_0 = "Q5_0", "Q8_0"  # integer grids in groups of 32 (ops.grid_formats)


def gguf_name(name: str) -> str:
    return gguf_names([name])[name]


def q4_k_m_rules() -> dict[str, str]:
    """llama.cpp's Q4_K_M mixture for GRID_LLAMA's projections, as a regex per layer."""
    module = CausalLMModule(model_config=GRID_LLAMA, seed=0)
    layers = {n: m for n, m in module.model.named_modules() if n.endswith(PROJECTIONS)}
    return {rf"^{re.escape(n)}$": spec.format for n, spec in q4_k_m_grids(layers).items()}


def read_back(folder) -> dict[str, tuple[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(folder / FILE))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(data)))
    return out


def file_type_of(folder) -> int:
    reader = gguf.GGUFReader(str(folder / FILE))
    return int(reader.fields["general.file_type"].contents())


def expected_matrix(module, name, layer) -> torch.Tensor:
    heads = {
        "q_proj": module.model.config.num_attention_heads,
        "k_proj": module.model.config.num_key_value_heads,
    }
    weight = weight_matrix(layer).detach().float()
    short = name.rsplit(".", 1)[-1]
    return _permute_rows(weight, heads[short]) if short in heads else weight


@pytest.mark.parametrize(
    ("grid_format", "kind"),
    [("Q4_K", "Q4_K"), ("Q5_K", "Q5_K"), ("Q6_K", "Q6_K"), ("mxfp4", "MXFP4")],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_kquant_and_mxfp4_blocks_decode_bit_exact(tmp_path, grid_format, kind, sparsity):
    module = grid_lm(grid_format, sparsity=sparsity)
    manifest = ppq_lightning.export(module, "gguf", tmp_path / "g")
    assert manifest["block_types"] == {kind: 14}
    assert manifest["max_abs_error_vs_grid"] == 0.0
    tensors = read_back(tmp_path / "g")
    for name, layer, _ in compressed_modules(module.model):
        stored_kind, decoded = tensors[gguf_name(name)]
        assert stored_kind == kind
        expected = expected_matrix(module, name, layer)
        assert torch.equal(decoded, expected), name  # gguf's dequantizer: our values exactly
        if sparsity:
            assert (decoded[expected == 0] == 0).all()  # pruned zeros decode to +-0
    want = {"Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}
    want["mxfp4"] = "MOSTLY_MXFP4_MOE"
    assert file_type_of(tmp_path / "g") == getattr(gguf.LlamaFileType, want[grid_format])


def test_q5_0_blocks_read_back_within_fp16_of_the_scale(tmp_path):
    module = grid_lm(Q5_0)
    manifest = ppq_lightning.export(module, "gguf", tmp_path / "g")
    assert manifest["block_types"] == {"Q5_0": 14}
    assert file_type_of(tmp_path / "g") == gguf.LlamaFileType.MOSTLY_Q5_0
    tensors = read_back(tmp_path / "g")
    for name, layer, state in compressed_modules(module.model):
        decoded = tensors[gguf_name(name)][1]
        weight = expected_matrix(module, name, layer)
        # d is fp16: exact up to its rounding, relative 2**-11 of each value
        assert ((decoded - weight).abs() <= 2**-10 * weight.abs() + 1e-12).all(), name
        assert (decoded[weight == 0] == 0).all()
        codes = state.grid.quantize(weight_matrix(layer).float())
        assert codes.max() > 15  # the fifth bit is used (Q5_0's qh), not a 4-bit grid


def test_q4_k_m_mixture_with_legacy_blocks(tmp_path):
    rules = {r"layers\.1\.self_attn\.o_proj$": Q8_0, **q4_k_m_rules()}
    module = grid_lm(rules)
    manifest = ppq_lightning.export(module, "gguf", tmp_path / "g")
    # two blocks: llama.cpp gives Q6_K to the last block's attn_v and ffn_down
    assert manifest["block_types"] == {"Q6_K": 2, "Q4_K": 11, "Q8_0": 1}
    assert manifest["file_type"] == "MOSTLY_Q4_K_M"
    assert file_type_of(tmp_path / "g") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    tensors = read_back(tmp_path / "g")
    for name, layer, state in compressed_modules(module.model):
        kind, decoded = tensors[gguf_name(name)]
        assert kind == ("Q8_0" if state.grid_format == "int" else state.grid_format), name
        if kind != "Q8_0":
            assert torch.equal(decoded, expected_matrix(module, name, layer)), name


def test_transformers_reads_kquant_and_mxfp4_files_in_a_fresh_process(tmp_path):
    ids = token_batches(1)[0]
    cases = {
        "q4_k_m": q4_k_m_rules(),
        "q5_k": "Q5_K",
        "mxfp4": "mxfp4",
        "q5_0": Q5_0,
    }
    modules, jobs = {}, {}
    for label, formats in cases.items():
        modules[label] = grid_lm(formats, sparsity=0.5 if label == "q4_k_m" else 0.0)
        ppq_lightning.export(modules[label], "gguf", tmp_path / label)
        jobs[label] = (tmp_path / label, "gguf")
    got, errors = fresh_logits(tmp_path, jobs, ids)
    assert not errors
    for label, module in modules.items():
        expected = module.model(ids).logits
        # transformers dequantizes with gguf's dequantizer (K-quants and MXFP4: our values
        # exactly); the embeddings, norms and output it reads as float32; what differs is the
        # order of float32 operations in its model (Q5_0: plus the fp16 rounding of d)
        tolerance = 1e-2 if label == "q5_0" else 1e-4
        difference = (got[label] - expected).abs().max()
        assert difference <= tolerance * expected.abs().max(), (label, float(difference))


@pytest.mark.parametrize("grid_format", ["nvfp4", "fp8", "fp8_block"])
def test_float_grids_without_a_gguf_block_are_refused_before_writing(tmp_path, grid_format):
    module = grid_lm({r"layers\.0\.mlp\.up_proj$": grid_format, ".": "Q4_K"})
    with pytest.raises(
        PPQConfigError,
        match=rf"layers\.0\.mlp\.up_proj: grid_format='{grid_format}' has no GGUF block type: ",
    ):
        ppq_lightning.export(module, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_file_type_names_llama_cpps_mixtures():
    assert file_type({"Q4_K": 9, "Q6_K": 5}) == "MOSTLY_Q4_K_M"
    assert file_type({"Q4_K": 9, "Q6_K": 4, "Q5_0": 1, "Q8_0": 1}) == "MOSTLY_Q4_K_M"
    assert file_type({"Q5_K": 3, "Q6_K": 1}) == "MOSTLY_Q5_K_M"
    assert file_type({"Q4_0": 14}) == "MOSTLY_Q4_0"
    assert file_type({"Q4_1": 10, "Q8_0": 4}) == "MOSTLY_Q4_1"
