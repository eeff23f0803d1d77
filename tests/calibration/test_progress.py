"""Block progress files: fingerprint, round trip, mismatches and damaged files."""

import json
import warnings

import pytest
import torch

from ppq_lightning.calibration.progress import (
    BlockProgress,
    ProgressMismatchWarning,
    ProgressOffWarning,
    batches_digest,
)
from ppq_lightning.compressed.state import record_grid, record_mask, record_stage
from ppq_lightning.errors import CorruptStateError
from ppq_lightning.ops.quant_grid import compute_grid
from tests.helpers import assert_same_state as _assert_equal
from tests.helpers import plain_llama as _llama
from tests.helpers import state_copy as _state

STAGE = "GPTQ{'bits': 4}"


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=generator) for _ in range(2)]


def _names(model) -> list[str]:
    return [f"model.layers.{i}" for i in range(len(model.model.layers))]


def _begin(tmp_path, model, batches=None, identity=STAGE, metrics=None) -> BlockProgress:
    progress = BlockProgress(tmp_path, "gptq", identity, metrics=metrics)
    progress.begin(model, _names(model), batches if batches is not None else _batches())
    return progress


def _compress(block, tag: str = "gptq") -> None:
    """What a stage does to a block: quantized, pruned weights and their records."""
    for layer in (block.self_attn.q_proj, block.mlp.up_proj):
        grid = compute_grid(layer.weight.data, 4)
        layer.weight.data = grid.fake_quantize(layer.weight.data)
        record_grid(layer, grid)
        record_mask(layer, layer.weight.data.abs() > 0.01)
        record_stage(layer, {"stage": tag, "method": "GPTQ", "kind": "Q", "bits": 4})


def test_a_saved_block_loads_bit_for_bit_into_a_fresh_model(tmp_path):
    model, fresh = _llama(), _llama()
    metrics = {}
    progress = _begin(tmp_path, model, metrics=metrics)
    block = model.model.layers[1]
    assert not progress.resumable(1, block)
    _compress(block)
    metrics["model.layers.1.self_attn.q_proj"] = {"obs_loss": 0.125, "bits": 4.0}
    progress.save(1, "model.layers.1", block)
    assert progress.saved == [1]

    restored = {}
    again = _begin(tmp_path, fresh, metrics=restored)
    assert again.folder == progress.folder and set(again.files) == {1}
    assert not again.resumable(0, fresh.model.layers[0])  # no file for block 0
    assert again.resumable(1, fresh.model.layers[1])
    again.load(1, fresh.model.layers[1])
    _assert_equal(_state(fresh), _state(model))  # tensors, masks, grids, histories
    assert restored == metrics and again.resumed == [1]


def test_the_metrics_of_each_block_go_to_its_own_file(tmp_path):
    model = _llama()
    metrics = {}
    progress = _begin(tmp_path, model, metrics=metrics)
    for index in (0, 1):
        block = model.model.layers[index]
        progress.resumable(index, block)
        metrics[f"layer{index}"] = {"loss": float(index)}
        progress.save(index, f"model.layers.{index}", block)
    restored = {}
    again = _begin(tmp_path, _llama(), metrics=restored)
    fresh = _llama()
    again.resumable(0, fresh.model.layers[0])
    again.load(0, fresh.model.layers[0])
    assert restored == {"layer0": {"loss": 0.0}}


@pytest.mark.parametrize("change", ["identity", "data", "outside", "structure"])
def test_another_stage_data_or_model_gets_another_folder_and_a_warning(tmp_path, change):
    model = _llama()
    progress = _begin(tmp_path, model)
    progress.resumable(0, model.model.layers[0])
    progress.save(0, "model.layers.0", model.model.layers[0])
    other, batches, identity = _llama(), _batches(), STAGE
    if change == "identity":
        identity = "GPTQ{'bits': 3}"
    elif change == "data":
        batches = _batches(seed=1)
    elif change == "outside":
        with torch.no_grad():
            other.lm_head.weight[0, 0] += 1
    else:
        other.model.norm.weight.data = torch.ones(32, dtype=torch.float64)
    expected = {
        "identity": "the stage's configuration",
        "data": "the calibration data",
        "outside": "the model's weights outside its blocks",
        "structure": "the model's structure",
    }[change]
    with pytest.warns(ProgressMismatchWarning, match=expected) as record:
        again = _begin(tmp_path, other, batches, identity)
    assert str(progress.folder) in str(record[0].message)
    assert again.folder != progress.folder and again.files == {}
    assert not again.resumable(0, other.model.layers[0])
    assert (progress.folder / "block-00000.safetensors").exists()  # left for its own run


def test_a_block_whose_weights_changed_is_not_resumed_nor_any_after_it(tmp_path):
    model = _llama()
    progress = _begin(tmp_path, model)
    for index in range(3):
        block = model.model.layers[index]
        progress.resumable(index, block)
        _compress(block)
        progress.save(index, f"model.layers.{index}", block)
    fresh = _llama()
    with torch.no_grad():  # an earlier stage produced other weights in block 1
        fresh.model.layers[1].mlp.down_proj.weight[0, 0] += 1
    again = _begin(tmp_path, fresh)
    assert again.resumable(0, fresh.model.layers[0])
    with pytest.warns(ProgressMismatchWarning, match="block 1's weights differ"):
        assert not again.resumable(1, fresh.model.layers[1])
    assert sorted(p.name for p in again.folder.glob("block-*")) == ["block-00000.safetensors"]
    assert not again.resumable(2, fresh.model.layers[2])


def test_a_recorded_history_counts_in_the_hash_before_compression(tmp_path):
    model, fresh = _llama(), _llama()
    record_stage(model.model.layers[0].mlp.up_proj, {"stage": "earlier", "method": "X"})
    progress = _begin(tmp_path, model)
    progress.resumable(0, model.model.layers[0])
    progress.save(0, "model.layers.0", model.model.layers[0])
    record_stage(fresh.model.layers[0].mlp.up_proj, {"stage": "other", "method": "X"})
    again = _begin(tmp_path, fresh)
    with pytest.warns(ProgressMismatchWarning):
        assert not again.resumable(0, fresh.model.layers[0])


def _saved(tmp_path) -> tuple[BlockProgress, object]:
    model = _llama()
    progress = _begin(tmp_path, model)
    progress.resumable(0, model.model.layers[0])
    _compress(model.model.layers[0])
    progress.save(0, "model.layers.0", model.model.layers[0])
    return progress, progress.files[0]


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptStateError, match="cannot be read") as info:
        _begin(tmp_path, _llama())
    assert str(path) in str(info.value) and "delete" in str(info.value)


def test_a_flipped_byte_is_refused_and_the_block_is_unchanged(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    fresh = _llama()
    before = _state(fresh)
    again = _begin(tmp_path, fresh)
    assert again.resumable(0, fresh.model.layers[0])
    with pytest.raises(CorruptStateError, match="checksum"):
        again.load(0, fresh.model.layers[0])
    _assert_equal(_state(fresh), before)


def test_a_file_of_another_format_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "other", "index": "0"})
    with pytest.raises(CorruptStateError, match="not a ppq-block-progress/1 file"):
        _begin(tmp_path, _llama())


def test_finish_deletes_the_folder(tmp_path):
    progress, _ = _saved(tmp_path)
    progress.finish()
    assert not progress.folder.exists() and not (tmp_path / "ppq_progress").exists()


def test_the_folder_records_what_its_fingerprint_is_made_of(tmp_path):
    progress = _begin(tmp_path, _llama())
    recorded = json.loads((progress.folder / "progress.json").read_text())
    assert recorded["stage"] == STAGE and recorded["name"] == "gptq"
    assert recorded["data"] == batches_digest(_batches())


def test_batches_hash_by_content_and_an_unknown_object_turns_progress_off(tmp_path):
    a = [{"input_ids": torch.arange(6).reshape(2, 3), "labels": None, "n": 3}]
    b = [{"input_ids": torch.arange(6).reshape(3, 2), "labels": None, "n": 3}]
    assert batches_digest(a) == batches_digest([dict(a[0])])
    assert batches_digest(a) != batches_digest(b)  # same bytes, another shape
    progress = BlockProgress(tmp_path, "gptq", STAGE)
    with pytest.warns(ProgressOffWarning, match="object"):
        progress.begin(_llama(), ["model.layers.0"], [[object()]])
    assert not progress.active and not progress.resumable(0, _llama().model.layers[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        progress.save(0, "model.layers.0", _llama().model.layers[0])  # nothing, silently
    assert not (tmp_path / "ppq_progress").exists()
