import pickle

import pytest
import torch

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import export_lightning_checkpoint, load_compressed
from ppq_lightning.export.checkpoint import load_lightning_checkpoint, safe_torch_load
from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer, token_batches


class Bomb:
    """Runs code when unpickled."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_pickle_bomb_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "bomb.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": Bomb()}, f)
    with pytest.raises(PPQConfigError, match="asks to run code on load, refused"):
        safe_torch_load(tmp_path / "bomb.ckpt")
    with pytest.raises(PPQConfigError, match="asks to run code"):
        export_lightning_checkpoint(tmp_path / "bomb.ckpt", "ppq", tmp_path / "out")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, tmp_path / "x.ckpt")
    data = (tmp_path / "x.ckpt").read_bytes()
    (tmp_path / "x.ckpt").write_bytes(data[:200])
    with pytest.raises(PPQConfigError, match="not a readable checkpoint"):
        safe_torch_load(tmp_path / "x.ckpt")
    with pytest.raises(PPQConfigError, match="an existing checkpoint file"):
        safe_torch_load(tmp_path / "nothing.ckpt")


def test_a_fit_checkpoint_exports(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")]
    trainer = make_trainer(tmp_path, stages, max_steps=1, limit_val_batches=1)
    trainer.fit(module, datamodule=tiny_data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    rebuilt = load_lightning_checkpoint(tmp_path / "last.ckpt")
    assert check_invariants(rebuilt) == 14
    export_lightning_checkpoint(tmp_path / "last.ckpt", "ppq", tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    ids = token_batches(1)[0]
    assert torch.equal(loaded(ids), module.eval()(ids))
