"""Weights on disk (``modules.offload``): every method bit-identical to the model in memory,
one block resident at a time (counted), source files never written, rollback exact."""

import hashlib
import tempfile

import pytest
import torch
from torch import nn

from ppq_lightning.calibration.blocks import find_block_chain
from ppq_lightning.callbacks import (
    GPTQ,
    BasisSharing,
    BlockRemoval,
    ChannelPruning,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models.loading import load_causal_lm
from ppq_lightning.modules.offload import (
    DiskWeights,
    disk_weights,
    offload_to_disk,
    snapshot,
    stored,
)
from ppq_lightning.modules.rollback import restored_on_error
from tests.helpers import TINY_LLAMA, token_batches

METHODS = {
    "gptq": lambda: GPTQ(bits=4),
    "gptq_g16_actorder": lambda: GPTQ(bits=3, group_size=16, act_order=True),
    "sparsegpt": lambda: SparseGPT(sparsity=0.5),
    "wanda": lambda: Wanda(sparsity=0.5),
    "rtn": lambda: RTNQuantization(bits=4),
    "magnitude": lambda: MagnitudePruning(sparsity=0.5),
    "channels": lambda: ChannelPruning(ratio=0.25),
    "sleb": lambda: BlockRemoval(n_blocks=1),
}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def checkpoint(request, tmp_path_factory):
    """A tiny Llama (3 blocks, tied embeddings) saved as safetensors in ``dtype``."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    config = {**TINY_LLAMA, "num_hidden_layers": 3, "tie_word_embeddings": True}
    model = load_causal_lm(config=config, dtype=request.param, seed=0)
    model.save_pretrained(folder)
    return folder, request.param


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _tensors(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _block_bytes(model: nn.Module) -> int:
    chain = find_block_chain(model)
    return max(
        sum(t.numel() * t.element_size() for t in block.state_dict().values())
        for block in chain.blocks
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_disk_equals_memory_with_one_block_resident(checkpoint, method, tmp_path):
    folder, dtype = checkpoint
    before = _digest(folder)
    in_memory = load_causal_lm(str(folder), dtype=dtype)
    on_disk = load_causal_lm(str(folder), dtype=dtype, offload_folder=str(tmp_path / "off"))
    store = disk_weights(on_disk)
    assert store is not None and all(stored(t) for t in _tensors(on_disk).values())
    assert on_disk.lm_head.weight is on_disk.model.embed_tokens.weight  # still tied
    one_block = _block_bytes(on_disk)
    data = token_batches(3)
    METHODS[method]().apply(in_memory, dataloader=data)
    METHODS[method]().apply(on_disk, dataloader=data)
    expected, got = _tensors(in_memory), _tensors(on_disk)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert in_memory.state_dict().keys() == on_disk.state_dict().keys()
    # counted, not timed: never more than one block's tensors materialized at once
    assert store.traffic.peak_resident <= one_block
    assert (store.traffic.peak_resident > 0) == (method != "sleb")  # SLEB writes no weight
    assert _digest(folder) == before  # the user's checkpoint is never written
    logits = token_batches(1)[0]
    assert torch.equal(in_memory(logits).logits, on_disk(logits).logits)


def test_a_failing_stage_leaves_weights_on_disk_exactly_as_they_were(checkpoint, tmp_path):
    folder, dtype = checkpoint
    model = load_causal_lm(str(folder), dtype=dtype, offload_folder=str(tmp_path / "off"))
    before = {k: v.clone() for k, v in _tensors(model).items()}
    stage = GPTQ(bits=4)
    original = stage.compress_layer

    def fail_late(name, layer, statistic):
        if name.startswith("model.layers.2."):
            raise RuntimeError("the device ran out of memory")
        return original(name, layer, statistic)

    stage.compress_layer = fail_late
    with pytest.raises(RuntimeError, match="out of memory"):
        stage.apply(model, dataloader=token_batches(2))
    after = _tensors(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(stored(t) for t in after.values())  # still on disk, not copied into memory


@pytest.mark.parametrize(
    "stage",
    [
        lambda: MagnitudePruning(sparsity=0.5, scope="global"),
        lambda: RTNQuantization(bits=4, promote={"bits": 8, "fraction": 0.5}),
        lambda: BasisSharing(group_size=2, ratio=0.5),  # its bases span blocks
    ],
)
def test_a_stage_taking_layers_together_is_refused_on_disk_before_any_change(stage, tmp_path):
    model = load_causal_lm(config=TINY_LLAMA, seed=0)
    store = offload_to_disk(model, tmp_path / "off")
    before = {k: v.clone() for k, v in _tensors(model).items()}
    written = store.traffic.blocks_written
    with pytest.raises(PPQConfigError, match="cannot run on weights on disk"):
        stage().apply(model, dataloader=token_batches(2))
    assert all(torch.equal(before[k], v) for k, v in _tensors(model).items())
    assert store.traffic.blocks_written == written


def test_an_in_memory_model_moved_to_disk_compresses_identically(tmp_path):
    reference = load_causal_lm(config=TINY_LLAMA, seed=0)
    model = load_causal_lm(config=TINY_LLAMA, seed=0, offload_folder=str(tmp_path / "off"))
    assert disk_weights(model) is not None
    data = token_batches(2)
    Wanda(sparsity=0.5).apply(reference, dataloader=data)
    Wanda(sparsity=0.5).apply(model, dataloader=data)
    expected = _tensors(reference)
    assert all(torch.equal(expected[k], v) for k, v in _tensors(model).items())


def test_the_rollback_keeps_weights_in_memory_on_disk_not_in_memory(tmp_path, monkeypatch):
    """An in-memory model's rollback copy is a file in $TMPDIR, mapped (no resident copy)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    layer = nn.Linear(256, 256)
    seen = []
    with pytest.raises(RuntimeError), restored_on_error(layer, {"": layer}):
        folders = [p for p in tmp_path.iterdir() if p.name.startswith("ppq-rollback-")]
        seen = [f.stat().st_size for d in folders for f in d.iterdir()]
        layer.weight.data.zero_()
        raise RuntimeError("fails")
    assert sum(seen) >= 256 * 256 * 4  # the weight went to disk
    assert not list(tmp_path.iterdir())  # and the folder is gone
    assert layer.weight.abs().sum() > 0  # restored


def test_snapshot_keeps_views_of_a_store_by_reference(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64))
    offload_to_disk(model, tmp_path / "off")
    weight = model[0].weight.data
    kept = snapshot({"w": weight}, tmp_path)
    assert kept["w"].data_ptr() == weight.data_ptr()  # no copy
    plain = torch.randn(64, 64)
    copied = snapshot({"w": plain}, tmp_path)["w"]
    assert torch.equal(copied, plain) and copied.data_ptr() != plain.data_ptr()


def test_an_unwritable_offload_folder_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PPQConfigError, match=r"offload_folder=.*cannot be written"):
        DiskWeights(blocker / "off")


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_tensor(checkpoint, tmp_path):
    folder, dtype = checkpoint
    other = tmp_path / "other"
    other.mkdir()
    wider = {**TINY_LLAMA, "num_hidden_layers": 3, "intermediate_size": 96}
    load_causal_lm(config=wider, dtype=dtype).save_pretrained(other)
    for name in ("config.json",):
        (other / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(PPQConfigError, match=r"mlp.*shape"):
        load_causal_lm(str(other), dtype=dtype, offload_folder=str(tmp_path / "off"))


def test_evaluation_streams_blocks_and_equals_memory(checkpoint, tmp_path, monkeypatch):
    """``CausalLMModule`` with ``offload_folder``: the same perplexity, each block's pages
    released after its forward (counted)."""
    from ppq_lightning.models import CausalLMModule
    from ppq_lightning.modules import offload

    folder, dtype = checkpoint
    released = []
    real = offload.DiskWeights.release
    monkeypatch.setattr(
        offload.DiskWeights, "release", lambda self, m: (released.append(m), real(self, m))
    )
    windows = [
        torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(k)) for k in range(2)
    ]
    in_memory = CausalLMModule(model=str(folder), dtype=dtype).evaluate(windows)
    module = CausalLMModule(model=str(folder), dtype=dtype, offload_folder=str(tmp_path / "o"))
    assert module.evaluate(windows) == in_memory
    blocks = set(find_block_chain(module.model).blocks)
    assert sum(1 for m in released if m in blocks) == len(blocks) * len(windows)
    # and what is not a block: the embedding, the final norm, the head
    hf = module.model
    assert {id(hf.model.embed_tokens), id(hf.model.norm), id(hf.lm_head)} <= {
        id(m) for m in released
    }


def test_the_summary_reads_no_mask_whole(tmp_path, monkeypatch):
    """C needs the count of nonzero weights, not the unpacked mask (one byte per weight, and
    the pages of the packed one would stay resident after the layer is released)."""
    from ppq_lightning.compressed import state as state_module
    from ppq_lightning.compressed.accounting import compression_summary

    model = load_causal_lm(config=TINY_LLAMA, seed=0, offload_folder=str(tmp_path / "o"))
    Wanda(sparsity=0.5).apply(model, dataloader=token_batches(2))
    unpacked = []
    real = state_module.CompressionState.mask
    monkeypatch.setattr(
        state_module.CompressionState,
        "mask",
        property(lambda self: unpacked.append(1) or real.fget(self), real.fset),
    )
    summary = compression_summary(model)
    assert summary.sparsity > 0.4 and not unpacked


def test_stream_blocks_on_a_device_puts_the_views_back(checkpoint, tmp_path):
    """With ``device``, each block runs on a copy there and its weights are the mapped views
    again after its forward (run here with the CPU as the device)."""
    from ppq_lightning.modules.offload import streaming

    folder, dtype = checkpoint
    reference = load_causal_lm(str(folder), dtype=dtype)
    model = load_causal_lm(str(folder), dtype=dtype, offload_folder=str(tmp_path / "o"))
    tokens = token_batches(1)[0]
    with streaming(find_block_chain(model).blocks, device="cpu"):
        logits = model(tokens).logits
    assert torch.equal(logits, reference(tokens).logits)
    assert all(stored(t) for t in _tensors(model).values())


def test_a_copy_shares_the_weights_on_disk_and_a_stage_on_it_leaves_the_original(
    checkpoint, tmp_path
):
    """What a study does for each order: copy the prefix's model, compress the copy."""
    from ppq_lightning.modules.offload import copy_model

    folder, dtype = checkpoint
    model = load_causal_lm(str(folder), dtype=dtype, offload_folder=str(tmp_path / "o"))
    before = {k: v.clone() for k, v in _tensors(model).items()}
    twin = copy_model(model)
    pairs = zip(_tensors(model).values(), _tensors(twin).values(), strict=True)
    assert all(a.data_ptr() == b.data_ptr() for a, b in pairs)  # no copy in memory
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    Wanda(sparsity=0.5).apply(twin, dataloader=token_batches(2))
    assert all(torch.equal(before[k], v) for k, v in _tensors(model).items())
    reference = load_causal_lm(str(folder), dtype=dtype)
    Wanda(sparsity=0.5).apply(reference, dataloader=token_batches(2))
    expected = _tensors(reference)
    assert all(torch.equal(expected[k], v) for k, v in _tensors(twin).items())


def test_the_files_a_store_wrote_go_with_the_model(tmp_path):
    import gc

    model = load_causal_lm(config=TINY_LLAMA, seed=0, offload_folder=str(tmp_path / "o"))
    Wanda(sparsity=0.5).apply(model, dataloader=token_batches(2))
    assert list((tmp_path / "o").iterdir())
    del model
    gc.collect()
    assert not list((tmp_path / "o").iterdir())


def test_the_models_own_folder_is_refused_as_offload_folder(checkpoint):
    folder, dtype = checkpoint
    before = _digest(folder)
    with pytest.raises(PPQConfigError, match=r"offload_folder.*other than the model.s own"):
        load_causal_lm(str(folder), dtype=dtype, offload_folder=str(folder))
    assert _digest(folder) == before


def _failing_gptq(block: str) -> GPTQ:
    stage = GPTQ(bits=4)
    original = stage.compress_layer

    def fail(name, layer, statistic):
        if name.startswith(block):
            raise RuntimeError("the device ran out of memory")
        return original(name, layer, statistic)

    stage.compress_layer = fail
    return stage


def test_a_second_stage_failing_leaves_the_weights_on_disk_and_no_orphan_file(tmp_path):
    """The first stage's written blocks are what a failing second stage restores: they must
    still count as on disk (not copied into memory), and the failed stage's files go."""
    folder = tmp_path / "o"
    model = load_causal_lm(
        config={**TINY_LLAMA, "num_hidden_layers": 3}, offload_folder=str(folder)
    )
    Wanda(sparsity=0.5).apply(model, dataloader=token_batches(2))
    before = {k: v.clone() for k, v in _tensors(model).items()}
    with pytest.raises(RuntimeError, match="out of memory"):
        _failing_gptq("model.layers.2.").apply(model, dataloader=token_batches(2))
    after = _tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(stored(t) for t in after.values())
    store = disk_weights(model)
    used = {store.file_of(t).path for t in after.values()}
    # no orphan: every file left is one the model points at (the first stage's blocks that the
    # failed stage had replaced are back, their files unlinked but mapped until the store goes)
    assert set(folder.iterdir()) <= used


def test_a_failed_write_names_the_offload_folder_and_leaves_the_model(tmp_path, monkeypatch):
    from ppq_lightning.modules import offload

    model = load_causal_lm(config=TINY_LLAMA, seed=0, offload_folder=str(tmp_path / "o"))
    before = {k: v.clone() for k, v in _tensors(model).items()}

    def full(tensors, path):
        raise RuntimeError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(offload, "_write", full)
    with pytest.raises(OSError, match="offload_folder") as raised:
        Wanda(sparsity=0.5).apply(model, dataloader=token_batches(2))
    assert raised.value.errno == 28  # still a full disk to `ppq`'s exit handling
    after = _tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(stored(t) for t in after.values())


def test_files_a_killed_process_left_are_deleted_and_stray_files_never_mapped(checkpoint, tmp_path):
    folder, dtype = checkpoint
    offload_folder = tmp_path / "o"
    offload_folder.mkdir()
    stale = offload_folder / "ppq-999999999-7f00-block-00000.safetensors"  # no such process
    stale.write_bytes(b"left by a SIGKILLed run")
    model = load_causal_lm(str(folder), dtype=dtype, offload_folder=str(offload_folder))
    assert not stale.exists()
    # a stray safetensors file beside the checkpoint (another model's offload file) is ignored
    other = tmp_path / "copy"
    other.mkdir()
    for path in folder.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    zeros = {k: torch.zeros_like(v) for k, v in _tensors(model).items()}
    from safetensors.torch import save_file

    save_file(zeros, other / "ppq-1-2-block-00000.safetensors")
    mapped = load_causal_lm(str(other), dtype=dtype, offload_folder=str(tmp_path / "o2"))
    expected = _tensors(load_causal_lm(str(folder), dtype=dtype))
    assert all(torch.equal(expected[k], v) for k, v in _tensors(mapped).items())


def test_a_model_on_disk_deep_copies_and_exports_to_compressed_tensors(tmp_path):
    import copy

    from ppq_lightning.export.api import export

    model = load_causal_lm(config=TINY_LLAMA, seed=0, offload_folder=str(tmp_path / "o"))
    RTNQuantization(bits=4).apply(model)
    twin = copy.deepcopy(model)  # a copy in memory, as deepcopy promises
    assert not any(stored(t) for t in _tensors(twin).values())
    export(model, "compressed-tensors", tmp_path / "ct")
    assert (tmp_path / "ct" / "export.json").is_file()
