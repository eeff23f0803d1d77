import pytest
import torch

import ppq_lightning
from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    GPTQ,
    BasisSharing,
    BlockRemoval,
    ChannelPruning,
    DepGraphPruning,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import load_compressed
from ppq_lightning.export.native import WEIGHTS, _bits_equal
from ppq_lightning.models import ImageClassifierModule
from tests.export.helpers import compressed_lm
from tests.helpers import make_trainer, token_batches

METHODS = {
    "magnitude": lambda: [MagnitudePruning(sparsity=0.5)],
    "magnitude_2_4": lambda: [MagnitudePruning(pattern="2:4")],
    "wanda": lambda: [Wanda(sparsity=0.5)],
    "rtn3_g16_sym": lambda: [RTNQuantization(bits=3, group_size=16, symmetric=True)],
    "gptq4_act_order": lambda: [GPTQ(bits=4, group_size=16, act_order=True)],
    "mixed": lambda: [RTNQuantization(bits=4, layer_bits={r"\.0\.": 2, r"\.1\.": 8})],
    "sparsegpt_gptq": lambda: [SparseGPT(sparsity=0.5, name="P"), GPTQ(bits=4, name="Q")],
    "gptq_magnitude": lambda: [GPTQ(bits=4, name="Q"), MagnitudePruning(sparsity=0.5, name="P")],
    "sparsegpt_2_4_q": lambda: [SparseGPT(pattern="2:4", bits=4)],
    "blocks_channels_rtn": lambda: [
        BlockRemoval(ratio=0.34, num_calibration_batches=1, name="B"),
        ChannelPruning(ratio=0.25, structure="both", name="C"),
        RTNQuantization(bits=4, name="Q"),
    ],
    "sharing_rtn": lambda family: [
        BasisSharing(group_size=2, ratio=0.5, projections=SHARED[family], name="S"),
        RTNQuantization(bits=8),
    ],
}
# every projection of a block, by family (BasisSharing's default names Llama's)
SHARED = {
    "llama": None,
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],  # transformers' Conv1D layers
}


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert _bits_equal(value, second[key]), key
        else:
            assert value == second[key], key


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_native_round_trip_is_bit_identical(tmp_path, family, method):
    stages = METHODS[method](family) if method == "sharing_rtn" else METHODS[method]()
    module = compressed_lm(*stages, family=family)
    manifest = ppq_lightning.export(module, "ppq", tmp_path / "out")
    assert manifest["weight_encodings"]["dense"] == 0  # nothing fell back to a dense copy
    loaded = load_compressed(tmp_path / "out")
    assert type(loaded) is type(module)  # a LightningModule exported, one loaded
    assert_bit_identical(module, loaded)
    assert check_invariants(loaded) == check_invariants(module)
    ids = token_batches(1)[0]
    assert torch.equal(loaded(ids), module(ids))
    network = load_compressed(
        tmp_path / "out", model=type(module)(model_config=module.hparams.model_config)
    )
    assert_bit_identical(module, network)


def test_file_size_agrees_with_measured_C(tmp_path):
    module = compressed_lm(GPTQ(bits=4, symmetric=True))  # per channel
    manifest = ppq_lightning.export(module, "ppq", tmp_path / "out")
    # float32 scales and packed zeros per row: 36 bits over 64 columns here, 16 in the accounting
    assert manifest["file_C"] == pytest.approx(manifest["measured_C"], rel=0.1)
    module = compressed_lm(SparseGPT(sparsity=0.75), RTNQuantization(bits=4))
    manifest = ppq_lightning.export(module, "ppq", tmp_path / "sparse")
    # the file keeps a code for every kept weight, the accounting only the nonzero ones; on
    # 64 columns the per-row overhead is large (SmolLM2: docs/export.md)
    assert manifest["file_C"] == pytest.approx(manifest["measured_C"], rel=0.15)
    # the counted layers shrink > 4x; the tiny model's file is mostly its dense embeddings
    # and the stages' records, so the whole file is about the dense size
    assert manifest["file_C"] > 4
    assert manifest["bytes"] < 1.05 * manifest["dense_bytes_at_b_orig"]


def test_kept_lora_adapters_round_trip(tmp_path, tiny_data):
    from ppq_lightning.models import CausalLMModule
    from tests.helpers import TINY_LLAMA

    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [RTNQuantization(bits=4, name="Q"), LoRAFineTune(r=2, name="L")]
    make_trainer(tmp_path, stages, max_steps=2, limit_val_batches=0).fit(
        module, datamodule=tiny_data
    )
    ppq_lightning.export(module, "ppq", tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    assert_bit_identical(module, loaded)
    ids = token_batches(1)[0]
    assert torch.equal(loaded(ids), module(ids))


def _images(n: int = 2):
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,)))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "stages",
    [
        lambda: [GPTQ(bits=4, name="Q"), MagnitudePruning(sparsity=0.5, name="P")],
        lambda: [DepGraphPruning(ratio=0.3, name="D"), RTNQuantization(bits=4, name="Q")],
    ],
    ids=["gptq_magnitude", "depgraph_rtn"],
)
def test_vision_models_round_trip(tmp_path, stages):
    module = ImageClassifierModule(
        "resnet18", num_classes=10, model_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16}
    )
    for stage in stages():
        stage.apply(module, dataloader=_images())
    ppq_lightning.export(module, "ppq", tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    assert_bit_identical(module, loaded)
    x = _images(1)[0][0]
    assert torch.equal(loaded(x), module(x))


def test_a_custom_module_needs_its_skeleton(tmp_path):
    from tests.compressed.helpers import quantized_pruned_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(quantized_pruned_linear(), torch.nn.ReLU())
    ppq_lightning.export(model, "ppq", tmp_path / "out")
    with pytest.raises(PPQConfigError, match="pass a freshly built one"):
        load_compressed(tmp_path / "out")
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.ReLU())
    assert_bit_identical(model, load_compressed(tmp_path / "out", model=fresh))


def test_errors_before_anything_is_written(tmp_path):
    module = compressed_lm(RTNQuantization(bits=4))
    with pytest.raises(PPQConfigError, match="format='onnx' is not allowed"):
        ppq_lightning.export(module, "onnx", tmp_path / "x")
    with pytest.raises(PPQConfigError, match="no compressed layers"):
        ppq_lightning.export(compressed_lm(), "ppq", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
    ppq_lightning.export(module, "ppq", tmp_path / "x")
    with pytest.raises(PPQConfigError, match="does not exist yet"):
        ppq_lightning.export(module, "ppq", tmp_path / "x")
    before = (tmp_path / "x" / WEIGHTS).read_bytes()
    ppq_lightning.export(compressed_lm(GPTQ(bits=3)), "ppq", tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / WEIGHTS).read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no staging folder left


def test_truncated_or_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    ppq_lightning.export(compressed_lm(RTNQuantization(bits=4)), "ppq", tmp_path / "x")
    file = tmp_path / "x" / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(PPQConfigError, match="truncated or changed after the export"):
        load_compressed(tmp_path / "x")  # export.json records its size and sha256
    (tmp_path / "x" / "export.json").unlink()  # a bare file: safetensors' own check
    with pytest.raises(PPQConfigError, match="truncated or corrupt"):
        load_compressed(tmp_path / "x")
    save_file({"a": torch.zeros(2)}, str(file))
    with pytest.raises(PPQConfigError, match="not a ppq export"):
        load_compressed(tmp_path / "x")
    with pytest.raises(PPQConfigError, match="an existing safetensors file"):
        load_compressed(tmp_path / "missing")


def test_weights_off_their_grid_are_stored_dense_not_lossy(tmp_path):
    module = compressed_lm(RTNQuantization(bits=4))
    name, layer, _ = next(iter(compressed_modules(module)))
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3  # left its grid (training without projection)
    manifest = ppq_lightning.export(module, "ppq", tmp_path / "x")
    assert manifest["weight_encodings"]["dense"] == 1
    from ppq_lightning.export.native import read

    _, metadata = read(tmp_path / "x")
    assert metadata["encodings"][f"{name}.weight"]["encoding"] == "dense"


def test_the_package_is_callable_from_the_top_level(tmp_path):
    import subprocess
    import sys

    code = (
        "import ppq_lightning, torch; from tests.compressed.helpers import quantized_pruned_linear;"
        "m = torch.nn.Sequential(quantized_pruned_linear());"
        f"print(ppq_lightning.export(m, 'ppq', {str(tmp_path / 'x')!r})['format'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ppq", done.stderr[-500:]


class _SharedModule(torch.nn.Module):
    """A module registered under two names, as the locuslab TCN registers ``self.conv1`` and
    ``self.net[0]``: the state dict holds its tensors under both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.seq = torch.nn.Sequential(
            torch.nn.Linear(16, 16),
            torch.nn.ReLU(),
            self.a,
            torch.nn.ReLU(),
            torch.nn.Linear(16, 2),
        )

    def forward(self, x):
        return self.seq(x)


def test_a_module_registered_under_two_names_reloads(tmp_path):
    # the load's declared-size check read the mask bits under the alias, where the file keeps
    # none, and refused the export as corrupt
    model = _SharedModule()
    MagnitudePruning(sparsity=0.5, targets=r"^a$").apply(model)
    RTNQuantization(bits=4, targets=r"^a$").apply(model)
    ppq_lightning.export(model, "ppq", tmp_path / "out")
    fresh = load_compressed(tmp_path / "out", model=_SharedModule())
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x)) and fresh.seq[2] is fresh.a
    assert check_invariants(fresh) == 1
