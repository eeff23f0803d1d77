"""Export of users' models with ``nn.MultiheadAttention`` compressed (#26): the native file
stores the projections' codes where the attention keeps them in one ``in_proj_weight``, its
size is what the measured C counts, it reloads bit for bit, and the formats that cannot hold
such a model refuse it before writing anything."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ppq_lightning.callbacks import (
    GPTQ,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
    Wanda,
)
from ppq_lightning.compressed.accounting import compression_summary, counted_layers
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import export, load_compressed
from ppq_lightning.export.native import STORED_PARTS, WEIGHTS
from ppq_lightning.export.native import read as read_native
from tests.export.test_native import assert_bit_identical
from tests.user_modules import modules


def _trainer(tmp_path, stages, **kwargs) -> L.Trainer:
    return L.Trainer(
        callbacks=stages,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def compressed_transformer(tmp_path, stages):
    """Lightning's demo Transformer, its stages fired by ``fit`` as a user runs them."""
    module = modules.demo_transformer()
    _trainer(tmp_path, stages, max_steps=0).fit(module, train_dataloaders=modules.token_pairs())
    return module


def compressed_vit(tmp_path, stages):
    """A user's torchvision ViT, its stages fired by ``validate``."""
    module = modules.UserClassifier("torchvision_vit")
    _trainer(tmp_path, stages).validate(module, dataloaders=modules.images(), verbose=False)
    return module


def _header_bytes(file) -> int:
    with open(file, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def _bytes_outside_counted_layers(module) -> int:
    """What a file must store besides the counted layers' weights: every tensor of the state
    dict that is not a counted layer's weight or grid/mask, nor an attention's in_proj_weight
    (its rows are the weights of the counted q/k/v projections)."""
    counted = {f"{layer}.{part}" for layer in counted_layers(module) for part in STORED_PARTS}
    return sum(
        t.numel() * t.element_size()
        for key, t in module.state_dict().items()
        if torch.is_tensor(t) and key not in counted and not key.endswith("in_proj_weight")
    )


def _assert_file_is_measured_C(module, folder, manifest, b_orig: int = 16) -> None:
    """``b_orig``: the bits the file stores an unquantized weight in (the model's dtype)."""
    file = folder / WEIGHTS
    layer_bytes = manifest["counted_layer_bytes"]
    # every byte of the file is the header, an uncounted tensor or a counted layer's weight
    outside = _bytes_outside_counted_layers(module)
    assert file.stat().st_size - _header_bytes(file) - outside == layer_bytes
    # and the counted layers' bytes are the measured C's bits (the file keeps float32 scales
    # and a code per kept weight where the accounting counts fp16 and nonzeros)
    summary = compression_summary(module, b_orig)
    measured_bits = summary.n_weights * b_orig / summary.measured_C
    assert 8 * layer_bytes == pytest.approx(measured_bits, rel=0.1)
    if b_orig == manifest["b_orig"]:
        assert manifest["file_C"] == pytest.approx(manifest["measured_C"], rel=0.1)


def _assert_same_outputs(module, reloaded, *batch) -> None:
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(module(*batch), reloaded(*batch))


@pytest.mark.parametrize(
    "stages",
    [
        lambda: [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")],
        lambda: [GPTQ(bits=4, group_size=50, name="Q")],
    ],
    ids=["magnitude_rtn4", "gptq4_g50"],
)
def test_demo_transformer_attention_is_stored_as_codes(tmp_path, stages):
    """Lightning's demo Transformer (encoder, decoder and cross attention): every q/k/v view is
    stored as codes (no dense in_proj_weight), the file is the size the measured C says, and
    the export reloads bit for bit into a fresh module."""
    module = compressed_transformer(tmp_path, stages())
    manifest = export(module, "ppq", tmp_path / "out")
    tensors, metadata = read_native(tmp_path / "out")
    assert not [key for key in tensors if key.endswith("in_proj_weight")]
    views = [key for key in tensors if key.endswith(("q_proj.weight", "k_proj.weight"))]
    assert len(views) == 2 * 6  # 2 encoder, 2 decoder self + 2 cross attention layers
    assert all(metadata["encodings"][key]["encoding"] == "codes" for key in views)
    assert manifest["weight_encodings"]["dense"] == 0
    _assert_file_is_measured_C(module, tmp_path / "out", manifest)

    reloaded = load_compressed(tmp_path / "out", model=modules.demo_transformer())
    assert_bit_identical(module, reloaded)
    _assert_same_outputs(module, reloaded, *next(iter(modules.token_pairs())))


def test_vit_attention_with_an_ignored_view(tmp_path):
    """A torchvision ViT compressed with its key projections ignored: the compressed views are
    codes, the uncompressed one dense (counted at full size, as the measured C counts it),
    and the rows reload in place."""
    stages = [
        Wanda(sparsity=0.5, name="P"),
        RTNQuantization(bits=4, ignore=["k_proj"], name="Q"),
    ]
    module = compressed_vit(tmp_path, stages)
    manifest = export(module, "ppq", tmp_path / "out")
    tensors, metadata = read_native(tmp_path / "out")
    encodings = metadata["encodings"]
    assert not [key for key in tensors if key.endswith("in_proj_weight")]
    keys = [key for key in encodings if key.endswith("k_proj.weight")]
    assert keys and all(encodings[key]["encoding"] == "values" for key in keys)  # pruned only
    keys = [key for key in encodings if key.endswith("q_proj.weight")]
    assert keys and all(encodings[key]["encoding"] == "codes" for key in keys)
    # the unquantized k_proj rows are float32 values in the file: measured at B_orig = 32
    _assert_file_is_measured_C(module, tmp_path / "out", manifest, b_orig=32)

    reloaded = load_compressed(tmp_path / "out", model=modules.UserClassifier("torchvision_vit"))
    assert_bit_identical(module, reloaded)
    _assert_same_outputs(module, reloaded, next(iter(modules.images()))[0])


@pytest.mark.parametrize(
    ("targets", "layer", "reason"),
    [
        (None, r"encoder\.layers\.0\.self_attn\.q_proj", "view of the attention's in_proj_weight"),
        (["out_proj"], r"encoder\.layers\.0\.self_attn\.out_proj", "would never run"),
    ],
    ids=["views", "out_proj"],
)
def test_peft_refuses_adapters_on_attention_projections(tmp_path, targets, layer, reason):
    """peft's adapters on an attention's projections cannot be reloaded on the user's base
    model (the views are not its modules; its attention never calls out_proj): refused before
    anything is written, naming the layer, the reason and format='ppq', which keeps them."""
    stages = [RTNQuantization(bits=4, name="Q"), LoRAFineTune(r=2, targets=targets, name="L")]
    module = modules.demo_transformer()
    _trainer(tmp_path, stages, max_steps=1).fit(module, train_dataloaders=modules.token_pairs())
    with pytest.raises(
        PPQConfigError,
        match=rf"LoRA adapter on model\.transformer\.{layer}.*"
        rf"{reason}.*format='ppq'",
    ):
        export(module, "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export(module, "ppq", tmp_path / "native")  # the fix the message names
    reloaded = load_compressed(tmp_path / "native", model=modules.demo_transformer())
    assert_bit_identical(module, reloaded)
    _assert_same_outputs(module, reloaded, *next(iter(modules.token_pairs())))


@pytest.mark.parametrize("format", ["compressed-tensors", "gguf"])
def test_runtime_formats_refuse_users_attention_models(tmp_path, format):
    """compressed-tensors and GGUF describe transformers / llama.cpp models: a user's ViT with a
    compressed nn.MultiheadAttention is refused before anything is written."""
    module = compressed_vit(tmp_path, [RTNQuantization(bits=4, name="Q")])
    with pytest.raises(PPQConfigError, match=r"use format='.*ppq"):
        export(module, format, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_refuses_a_transformers_model_with_a_compressed_attention(tmp_path):
    """A transformers model built on nn.MultiheadAttention (SigLIP's pooling head): its
    compressed q/k/v views are no layers of the model transformers builds, and torch's
    attention reads out_proj.weight as a tensor: refused, naming the layer, before writing."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    model = SiglipVisionModel(config)
    RTNQuantization(bits=4, targets=[r"head\.attention"]).apply(model)
    with pytest.raises(PPQConfigError, match=r"head\.attention\.q_proj: .*nn\.MultiheadAttention"):
        export(model, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model = SiglipVisionModel(config)
    RTNQuantization(bits=4, targets=[r"head\.attention\.out_proj"]).apply(model)
    with pytest.raises(PPQConfigError, match=r"head\.attention\.out_proj: .*out_proj\.weight"):
        export(model, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
