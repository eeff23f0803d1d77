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


def test_a_checkpoint_written_while_lora_trained_loads_and_exports(tmp_path, tiny_data):
    """#26 point 4: ``ModelCheckpoint``'s checkpoints of a fit with LoRA (then a stage that
    fires when training ends) lacked the LoRAFineTune record: loading and ``ppq export --ckpt``
    refused them. They load as the model computed then, and say what they hold."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ppq_lightning.callbacks import LoRAFineTune
    from ppq_lightning.cli.main import main
    from ppq_lightning.edits.training import MidFitCheckpointWarning

    module = CausalLMModule(model_config=TINY_LLAMA, seed=0, learning_rate=1e-2)
    stages = [
        MagnitudePruning(sparsity=0.5, name="P"),
        LoRAFineTune(r=2, alpha=4, name="L"),
        RTNQuantization(bits=4, name="Q"),
    ]
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(
        tmp_path, [*stages, saver], max_steps=2, limit_val_batches=0, enable_checkpointing=True
    )
    trainer.fit(module, datamodule=tiny_data)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    said = "before RTNQuantization 'Q' fired; it holds MagnitudePruning 'P', LoRAFineTune 'L'"
    with pytest.warns(MidFitCheckpointWarning, match=said):
        loaded = CausalLMModule.load_from_checkpoint(ckpt)
    assert check_invariants(loaded) == 14 and loaded.model.model.layers[0].mlp.up_proj.lora_A
    with pytest.warns(MidFitCheckpointWarning, match=said):
        manifest = main(
            ["export", "--ckpt", str(ckpt), "--format", "ppq", "--path", str(tmp_path / "x")]
        )
    reloaded = load_compressed(tmp_path / "x")
    ids = token_batches(1)[0]
    assert manifest["measured_C"] > 1 and torch.equal(reloaded(ids), loaded.eval()(ids))


def test_a_module_class_of_ones_own_is_checked(tmp_path, tiny_lm):
    torch.save({"state_dict": tiny_lm.state_dict(), "hyper_parameters": {}}, tmp_path / "x.ckpt")
    with pytest.raises(PPQConfigError, match=r"module_class=.* is not allowed: expected a Light"):
        load_lightning_checkpoint(tmp_path / "x.ckpt", module_class=torch.nn.Linear)
    # no class named, no hyperparameters of this project's modules: init_args alone do not say
    said = r"does not say which LightningModule it holds.*module_class=MyModule, \*\*init_args"
    with pytest.raises(PPQConfigError, match=said):
        load_lightning_checkpoint(tmp_path / "x.ckpt", seed=1)
    with pytest.raises(PPQConfigError, match=said):
        load_lightning_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(
        PPQConfigError,
        match=r"CausalLMModule cannot be built from .*\['bits'\]: .*unexpected keyword",
    ):
        load_lightning_checkpoint(tmp_path / "x.ckpt", CausalLMModule, bits=4)
    rebuilt = load_lightning_checkpoint(
        tmp_path / "x.ckpt", CausalLMModule, model_config=TINY_LLAMA
    )
    ids = token_batches(1)[0]
    assert torch.equal(rebuilt(ids), tiny_lm.eval()(ids))
