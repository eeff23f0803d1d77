import os

import pytest
import torch
from torch import nn

from ppq_lightning.compressed.state import get_state, record_mask
from ppq_lightning.modules.rollback import restored_on_error


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_a_failing_block_leaves_every_layer_as_it_was():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    layers = {"0": model[0], "2": model[2]}
    with pytest.raises(RuntimeError, match="late block") as info, restored_on_error(model, layers):
        model[0].weight.data.zero_()  # edited in place
        record_mask(model[0], torch.zeros(4, 4, dtype=torch.bool))  # state added
        model[2] = nn.Linear(4, 2)  # replaced
        model[2].weight = nn.Parameter(torch.ones(2, 4))
        raise RuntimeError("late block")
    assert "restored" in info.value.__notes__[0]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[0].weight is weight  # an optimizer holding it stays valid
    assert get_state(model[0]) is None and layers["2"] is model[2]


def test_compression_state_edited_in_place_is_restored():
    model = _model()
    record_mask(model[0], torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(KeyError), restored_on_error(model, {"0": model[0]}):
        record_mask(model[0], torch.zeros(4, 4, dtype=torch.bool))
        raise KeyError("x")
    assert bool(get_state(model[0]).mask.all())


def test_nothing_is_restored_when_the_block_succeeds():
    model = _model()
    with restored_on_error(model, {"0": model[0]}):
        model[0].weight.data.zero_()
    assert not model[0].weight.any()


def test_a_spill_folder_a_killed_process_left_is_deleted(tmp_path, monkeypatch):
    # A SIGKILL mid-stage runs no clean-up; the next stage deletes what that pid left.
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead = tmp_path / f"ppq-rollback-{finished.stdout.strip()}-abc"
    alive = tmp_path / f"ppq-rollback-{os.getppid()}-def"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "tmp0.safetensors").write_bytes(b"0" * 4096)
    model = _model()
    with restored_on_error(model, {"0": model[0]}):
        assert len(list(tmp_path.glob(f"ppq-rollback-{os.getpid()}-*"))) == 1
    assert not dead.exists() and alive.exists()
    assert not list(tmp_path.glob(f"ppq-rollback-{os.getpid()}-*"))  # its own, deleted at the end
