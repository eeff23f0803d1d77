"""#26: ``ppq export --ckpt`` on checkpoints of the user's own LightningModule.

A plain ``lightning.Trainer`` with ``ModelCheckpoint`` writes checkpoints that do not name the
module's class; ``ppq export --ckpt FILE --module package.module.ClassName`` rebuilds it (with
``--module_args`` for constructor arguments the hyperparameters lack), and a checkpoint of
``ppq fit`` (LightningCLI's ``_class_path``) needs no ``--module``. The modules are
``tests/user_modules/modules.py``'s, written the way their authors write them; the checkpoints
are taken mid-fit, while a training stage (LoRA kept or merged at the end, QAT) trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ppq_lightning.callbacks import LoRAFineTune, QuantizationAwareTraining
from ppq_lightning.cli.main import entry, main
from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.edits.training import MidFitCheckpointWarning
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import load_compressed
from ppq_lightning.export.checkpoint import load_lightning_checkpoint
from tests.user_modules.modules import (
    VOCAB,
    OfflineTransformer,
    UserCausalLM,
    UserClassifier,
    images,
    token_dicts,
    token_pairs,
)

ROOT = Path(__file__).resolve().parents[2]
MODULES = "tests.user_modules.modules"


class TokenDictData(L.LightningDataModule):
    """``token_dicts()`` as a datamodule, for ``ppq fit --data`` (LightningCLI needs one)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return token_dicts()


def fit_mid_checkpoint(
    folder: Path, module: L.LightningModule, loader: torch.utils.data.DataLoader, stage
) -> Path:
    """A plain Trainer fit of two steps with ``ModelCheckpoint`` every step; the checkpoint
    of step 1, written while the training stage trained."""
    saver = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[stage, saver],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=folder,
    )
    trainer.fit(module, loader)
    return folder / "ckpt" / "epoch=0-step=1.ckpt"


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Every tensor of the state dicts equal, and the same compression records."""
    got, want = loaded.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key

    def records(model: torch.nn.Module) -> dict[str, list]:
        return {name: state.stages for name, _, state in compressed_modules(model)}

    assert records(loaded) == records(expected) and records(expected)


CASES: dict[str, tuple[Callable[[], L.LightningModule], Callable, Callable]] = {
    "llm-lora-never": (UserCausalLM, token_dicts, lambda: LoRAFineTune(r=4, merge="never")),
    "llm-lora-at_end": (UserCausalLM, token_dicts, lambda: LoRAFineTune(r=4, merge="at_end")),
    "llm-qat": (UserCausalLM, token_dicts, lambda: QuantizationAwareTraining(bits=4)),
    "vit-lora": (
        lambda: UserClassifier("torchvision_vit"),
        images,
        lambda: LoRAFineTune(r=4, merge="at_end"),
    ),
    "vit-qat": (
        lambda: UserClassifier("torchvision_vit"),
        images,
        lambda: QuantizationAwareTraining(bits=4),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_plain_trainer_checkpoint_exports_with_module(tmp_path, case):
    """Before #26 `ppq export --ckpt` rebuilt this project's modules only (refusing a user's
    module, and `--module` was no argument); with `--module` it exports what
    `load_lightning_checkpoint` rebuilds, weight for weight."""
    build, data, stage = CASES[case]
    module = build()
    ckpt = fit_mid_checkpoint(tmp_path, module, data(), stage())
    cls = type(module)
    out = tmp_path / "out"
    argv = ["export", "--ckpt", str(ckpt), "--format", "ppq", "--path", str(out)]
    with pytest.warns(MidFitCheckpointWarning, match="taken during fit at epoch 0, step 1"):
        manifest = main([*argv, "--module", f"{MODULES}.{cls.__name__}"])
    with pytest.warns(MidFitCheckpointWarning):
        expected = load_lightning_checkpoint(ckpt, cls)
    assert manifest["format"] == "ppq" and (out / "export.json").is_file()
    # the fresh model is built as the user builds it, with the checkpoint's own arguments
    fresh = cls(**expected.hparams)
    loaded = load_compressed(out, model=fresh)
    assert_same_weights(loaded, expected)
    if "lora" in case:  # mid-fit: the adapters as they trained, unmerged, even with at_end
        assert any("lora_A" in key for key in loaded.state_dict())


def test_module_args_give_what_the_hyperparameters_lack(tmp_path):
    """Lightning's demo ``LightningTransformer`` saves no hyperparameters: its vocabulary size
    comes from ``--module_args``; without it, the error says what does not fit and how to
    pass the arguments (it was torch's size mismatch)."""
    torch.manual_seed(0)
    module = OfflineTransformer(vocab_size=VOCAB)
    ckpt = fit_mid_checkpoint(
        tmp_path, module, token_pairs(), QuantizationAwareTraining(bits=4, targets=r"linear[12]")
    )
    out = tmp_path / "out"
    argv = ["export", "--ckpt", str(ckpt), "--format", "ppq", "--path", str(out)]
    argv += ["--module", f"{MODULES}.OfflineTransformer"]
    with (
        pytest.warns(MidFitCheckpointWarning),
        pytest.raises(
            PPQConfigError,
            match=r"(?s)does not fit tests\.user_modules\.modules\.OfflineTransformer "
            r"built from .* \{\}: .*size mismatch.*--module_args",
        ),
    ):
        main(argv)
    assert not out.exists()
    with pytest.warns(MidFitCheckpointWarning):
        main([*argv, "--module_args", f'{{"vocab_size": {VOCAB}}}'])
    with pytest.warns(MidFitCheckpointWarning):
        expected = load_lightning_checkpoint(ckpt, OfflineTransformer, vocab_size=VOCAB)
    assert_same_weights(load_compressed(out, model=OfflineTransformer(vocab_size=VOCAB)), expected)
    # one argument at a time, as jsonargparse reads dicts, is the same
    with pytest.warns(MidFitCheckpointWarning):
        main([*argv, "--module_args.vocab_size", str(VOCAB), "--path", str(tmp_path / "b")])
    assert_same_weights(
        load_compressed(tmp_path / "b", model=OfflineTransformer(vocab_size=VOCAB)), expected
    )


def test_ppq_fit_of_a_user_module_exports_without_module(tmp_path, monkeypatch):
    """`ppq fit --model tests.user_modules.modules.UserCausalLM` records the class
    (LightningCLI's `_class_path`): `ppq export --ckpt` of its mid-fit checkpoint uses it (the
    hyperparameters ['lr'] were refused as no module of this project's)."""
    monkeypatch.chdir(tmp_path)  # `tests` is imported from sys.path, never the current folder
    folder = tmp_path / "fit"
    main(
        [
            "fit",
            "--model",
            f"{MODULES}.UserCausalLM",
            "--data",
            f"{__name__}.TokenDictData",
            "--trainer.max_steps",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(folder),
            "--trainer.callbacks+=ppq_lightning.callbacks.QuantizationAwareTraining",
            "--trainer.callbacks.bits",
            "4",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath",
            str(folder / "ckpt"),
            "--trainer.callbacks.every_n_train_steps",
            "1",
            "--trainer.callbacks.save_top_k",
            "-1",
        ]
    )
    ckpt = folder / "ckpt" / "epoch=0-step=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["_class_path"] == f"{MODULES}.UserCausalLM"
    out = tmp_path / "out"
    with pytest.warns(MidFitCheckpointWarning, match="QuantizationAwareTraining"):
        main(["export", "--ckpt", str(ckpt), "--format", "ppq", "--path", str(out)])
    with pytest.warns(MidFitCheckpointWarning):
        expected = load_lightning_checkpoint(ckpt, UserCausalLM)
    assert_same_weights(load_compressed(out, model=UserCausalLM()), expected)

    # a class path that cannot be imported here is named, with the way out
    saved["hyper_parameters"]["_class_path"] = "no_such_package_ppq.models.UserCausalLM"
    torch.save(saved, tmp_path / "moved.ckpt")
    argv = ["export", "--ckpt", str(tmp_path / "moved.ckpt"), "--format", "ppq"]
    with pytest.raises(
        PPQConfigError,
        match=r"names its module class in its hyperparameters \(LightningCLI's _class_path\).*"
        r"_class_path='no_such_package_ppq\.models\.UserCausalLM' is not allowed.*"
        r"No module named 'no_such_package_ppq'.*--module my_package",
    ):
        main([*argv, "--path", str(tmp_path / "moved")])
    assert not (tmp_path / "moved").exists()
    # --module chooses the class itself, and the checkpoint's is not imported
    with pytest.warns(MidFitCheckpointWarning):
        main([*argv, "--path", str(tmp_path / "moved"), "--module", f"{MODULES}.UserCausalLM"])
    assert_same_weights(load_compressed(tmp_path / "moved", model=UserCausalLM()), expected)


@pytest.fixture(scope="module")
def llm_checkpoint(tmp_path_factory) -> Path:
    """A mid-fit checkpoint of ``UserCausalLM`` (plain Trainer, LoRA)."""
    folder = tmp_path_factory.mktemp("llm")
    return fit_mid_checkpoint(folder, UserCausalLM(), token_dicts(), LoRAFineTune(r=4))


BAD_MODULES = [
    ("UserCausalLM", r"expected the dotted path of a LightningModule subclass"),
    ("tests.user_modules.modules.User-LM", r"expected the dotted path"),
    (
        "no_such_package_ppq.models.MyModule",
        r"importing 'no_such_package_ppq\.models' failed \(No module named "
        r"'no_such_package_ppq'\): install its package, or put the folder that holds it on "
        "PYTHONPATH",
    ),
    (f"{MODULES}.NoSuchModule", r"'tests\.user_modules\.modules' has no 'NoSuchModule'"),
    (f"{MODULES}.token_dicts", r"is <function token_dicts .*>, not a LightningModule class"),
    ("torch.nn.Linear", r"is <class 'torch\.nn\.modules\.linear\.Linear'>, not a Lightning"),
]


@pytest.mark.parametrize(("value", "said"), BAD_MODULES)
def test_a_bad_module_is_named_before_anything_is_read_or_written(
    tmp_path, llm_checkpoint, value, said
):
    out = tmp_path / "out"
    argv = ["export", "--ckpt", str(llm_checkpoint), "--format", "ppq", "--path", str(out)]
    with pytest.raises(PPQConfigError, match=rf"--module='{value}' is not allowed: .*{said}"):
        main([*argv, "--module", value])
    assert not out.exists()


def test_without_module_the_error_says_to_pass_it(tmp_path, llm_checkpoint, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["export", "--ckpt", str(llm_checkpoint), "--format", "ppq", "--path", str(out)]
    said = (
        rf"{llm_checkpoint} does not say which LightningModule it holds: .*hyperparameters "
        r"\['lr'\] are not those of .* Name your module's class: on the command line ppq export "
        rf"--ckpt {llm_checkpoint} --module my_package\.my_module\.MyModule --format ppq"
    )
    with pytest.raises(PPQConfigError, match=said):
        main(argv)
    # the console script says it in one line and exits 2
    monkeypatch.setattr(sys, "argv", ["ppq", *argv])
    with pytest.raises(SystemExit) as exit_:
        entry()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ppq: error: ") and "--module my_package.my_module.MyModule" in err
    assert not out.exists()
    # another module's class: the layers it lacks are named
    with pytest.raises(PPQConfigError, match=r"q_proj, which this UserClassifier lacks"):
        main([*argv, "--module", f"{MODULES}.UserClassifier"])
    assert not out.exists()


def test_module_and_module_args_apply_to_ckpt_only(tmp_path):
    base = ["export", "--config", "x.yaml", "--format", "ppq", "--path", str(tmp_path / "x")]
    with pytest.raises(PPQConfigError, match="--module applies to --ckpt only"):
        main([*base, "--module", f"{MODULES}.UserCausalLM"])
    with pytest.raises(PPQConfigError, match="--module_args applies to --ckpt only"):
        main([*base, "--module_args", '{"lr": 0.1}'])


def test_a_user_runs_ppq_export_from_a_shell(tmp_path, llm_checkpoint):
    """The console script, from the user's own folder, the module's package on PYTHONPATH."""
    script = Path(sys.executable).with_name("ppq")
    command = (
        [str(script)] if script.is_file() else [sys.executable, "-m", "ppq_lightning.cli.main"]
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            *command,
            "export",
            "--ckpt",
            str(llm_checkpoint),
            "--module",
            f"{MODULES}.UserCausalLM",
            "--format",
            "ppq",
            "--path",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "taken during fit at epoch 0" in done.stderr
    with pytest.warns(MidFitCheckpointWarning):
        expected = load_lightning_checkpoint(llm_checkpoint, UserCausalLM)
    assert_same_weights(load_compressed(out, model=UserCausalLM()), expected)


def test_an_existing_folder_is_refused_before_the_checkpoint_is_read(tmp_path):
    """`ppq export` read (and rebuilt) the checkpoint, or ran a study's stages, before it
    refused an existing --path; it is refused first: here the checkpoint does not exist."""
    (tmp_path / "out").mkdir()
    argv = ["export", "--ckpt", str(tmp_path / "none.ckpt"), "--format", "ppq"]
    with pytest.raises(PPQConfigError, match=r"path='.*out' is not allowed: expected a folder"):
        main([*argv, "--path", str(tmp_path / "out"), "--module", f"{MODULES}.UserCausalLM"])
    with pytest.raises(PPQConfigError, match=r"ckpt='.*none\.ckpt' is not allowed"):
        main([*argv, "--path", str(tmp_path / "out"), "--overwrite", "true"])
