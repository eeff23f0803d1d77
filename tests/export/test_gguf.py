import gguf
import numpy as np
import pytest
import torch

import ppq_lightning
from ppq_lightning.callbacks import GPTQ, MagnitudePruning, RTNQuantization
from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export.gguf import FILE, _permute_rows
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.mixed_precision import gguf_names
from ppq_lightning.modules.views import weight_matrix
from tests.export.fresh import fresh_logits
from tests.export.helpers import compressed_lm
from tests.helpers import token_batches

GRIDS = {
    "Q4_0": lambda: [RTNQuantization(bits=4, group_size=32, symmetric=True)],
    "Q4_1": lambda: [MagnitudePruning(sparsity=0.5), GPTQ(bits=4, group_size=32)],
    "Q8_0": lambda: [RTNQuantization(bits=8, group_size=32, symmetric=True)],
}


@pytest.mark.parametrize("kind", list(GRIDS))
def test_gguf_blocks_read_back_with_ggufs_dequantizer(tmp_path, kind):
    module = compressed_lm(*GRIDS[kind]())
    manifest = ppq_lightning.export(module, "gguf", tmp_path / "g")
    assert manifest["block_types"] == {kind: 14}
    reader = gguf.GGUFReader(str(tmp_path / "g" / FILE))
    tensors = {t.name: t for t in reader.tensors}
    config = module.model.config
    for name, layer, state in compressed_modules(module.model):
        tensor, short = tensors[gguf_names([name])[name]], name.rsplit(".", 1)[-1]
        assert tensor.tensor_type.name == kind
        decoded = torch.from_numpy(
            gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        )
        weight = weight_matrix(layer).float()
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        if short in heads:
            weight = _permute_rows(weight, heads[short])
        # exact up to the fp16 rounding of the scale (and, Q4_1, of the offset -d*z)
        step = state.grid._expand(state.grid.scale, weight.shape[1])
        assert ((decoded - weight).abs() <= 2**-10 * (weight.abs() + 16 * step)).all(), name
        assert (decoded[weight == 0] == 0).all() or kind == "Q4_1"
    assert manifest["max_abs_error_vs_grid"] < 1e-4


def test_transformers_reads_the_gguf_in_a_fresh_process(tmp_path):
    module = compressed_lm(RTNQuantization(bits=4, group_size=32, symmetric=True))
    ppq_lightning.export(module, "gguf", tmp_path / "g")
    ids = token_batches(1)[0]
    got, errors = fresh_logits(tmp_path, {"gguf": (tmp_path / "g", "gguf")}, ids)
    assert not errors
    expected = module.model(ids).logits
    assert (got["gguf"] - expected).abs().max() < 1e-2 * expected.abs().max()
    # and ppq loads it as a model too
    loaded = CausalLMModule(model=str(tmp_path / "g" / FILE))
    assert torch.allclose(loaded(ids), got["gguf"], atol=1e-5)


def test_grids_without_a_block_type_are_refused(tmp_path):
    with pytest.raises(
        PPQConfigError,
        match=r"group_size=None has no GGUF block type: GGUF export maps K-quant grids \(Q4_K, "
        r"Q5_K, Q6_K\), mxfp4 \(MXFP4\), and integer grids in groups of 32: 4-bit symmetric",
    ):
        ppq_lightning.export(compressed_lm(RTNQuantization(bits=4)), "gguf", tmp_path / "g")
    with pytest.raises(PPQConfigError, match="has no GGUF block type"):
        ppq_lightning.export(
            compressed_lm(RTNQuantization(bits=8, group_size=32)), "gguf", tmp_path / "g"
        )
    with pytest.raises(PPQConfigError, match="exports the architectures"):
        module = compressed_lm(RTNQuantization(bits=4, group_size=32, symmetric=True), family="opt")
        ppq_lightning.export(module, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()
