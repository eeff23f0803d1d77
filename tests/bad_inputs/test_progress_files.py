"""Bad block-progress files and arguments (issue #28, point 4): a truncated, altered or foreign
block file, or a progress folder that is a file, is refused naming it, and neither the model
nor any file changes; a bad ``block_checkpoints`` is refused naming the argument."""

from pathlib import Path

import pytest
import torch

from ppq_lightning.callbacks import GPTQ, Wanda
from ppq_lightning.errors import CorruptStateError, PPQConfigError
from tests.bad_inputs.helpers import assert_refused, names
from tests.helpers import plain_llama as _llama


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 8), generator=generator) for _ in range(2)]


def _gptq(folder: Path) -> GPTQ:
    return GPTQ(bits=4, num_calibration_batches=2, block_checkpoints=str(folder))


def _killed_after_two_blocks(folder: Path) -> list[Path]:
    """Progress of a GPTQ run that died in its third block; its block files."""
    stage = _gptq(folder)
    solve = stage.compress_layer

    def compress_layer(name, layer, statistic):
        if ".layers.2." in name:
            raise KeyboardInterrupt
        return solve(name, layer, statistic)

    stage.compress_layer = compress_layer
    with pytest.raises(KeyboardInterrupt):
        stage.apply(_llama(), dataloader=_batches())
    files = sorted((folder / "ppq_progress").rglob("block-*.safetensors"))
    assert len(files) == 2
    return files


def test_a_truncated_block_file(tmp_path):
    files = _killed_after_two_blocks(tmp_path)
    files[1].write_bytes(files[1].read_bytes()[:-100])
    model = _llama()
    assert_refused(
        lambda: _gptq(tmp_path).apply(model, dataloader=_batches()),
        CorruptStateError,
        names(str(files[1]), "cannot be read", "delete"),
        model,
        tmp_path,
    )


def test_a_block_file_altered_after_it_was_written(tmp_path):
    """Refused when its block is reached (block 0 is loaded first): the rollback puts the
    model back as it was."""
    files = _killed_after_two_blocks(tmp_path)
    data = bytearray(files[1].read_bytes())
    data[-5] ^= 0x01
    files[1].write_bytes(bytes(data))
    model = _llama()
    assert_refused(
        lambda: _gptq(tmp_path).apply(model, dataloader=_batches()),
        CorruptStateError,
        names(str(files[1]), "checksum", "delete"),
        model,
        tmp_path,
    )


def test_a_foreign_file_in_the_progress_folder(tmp_path):
    files = _killed_after_two_blocks(tmp_path)
    files[0].write_text("not a safetensors file")
    model = _llama()
    assert_refused(
        lambda: _gptq(tmp_path).apply(model, dataloader=_batches()),
        CorruptStateError,
        names(str(files[0]), "cannot be read"),
        model,
        tmp_path,
    )


def test_a_progress_folder_that_is_a_file(tmp_path):
    (tmp_path / "ppq_progress").write_text("")
    model = _llama()
    assert_refused(
        lambda: _gptq(tmp_path).apply(model, dataloader=_batches()),
        PPQConfigError,
        names(str(tmp_path / "ppq_progress"), "is a file", "block_checkpoints"),
        model,
        tmp_path,
    )


@pytest.mark.parametrize("value", [None, "", 0, 1.5, ["out"]])
def test_a_bad_block_checkpoints(value):
    with pytest.raises(PPQConfigError, match=names(f"block_checkpoints={value!r}", "folder")):
        Wanda(sparsity=0.5, block_checkpoints=value)
