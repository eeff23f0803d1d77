import re
import sys
from pathlib import Path

import pytest

from ppq_lightning.cli import main
from ppq_lightning.cli.class_paths import check_class_path, check_command_line
from ppq_lightning.errors import PPQConfigError

ROOT = Path(__file__).parents[2]


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """An installed package whose import leaves a marker file: proof of an import."""
    package = tmp_path / "site" / "ppq_probe_package"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\nclass Model:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield marker
    sys.modules.pop("ppq_probe_package", None)


VALID = [
    ["validate", "--config", str(ROOT / "configs" / "tiny" / "llama_p_then_q.yaml")],
    ["fit", "--trainer.callbacks+=ppq_lightning.callbacks.GPTQ"],
    ["fit", "--trainer.callbacks+", "GPTQ", "--trainer.callbacks.bits", "4"],
    ["fit", "--model", "CausalLMModule", "--data=ppq_lightning.datamodules.TextDataModule"],
    ["fit", "--trainer.logger", "false", "--trainer.strategy", "ddp"],
    ["fit", "--trainer.logger=lightning.pytorch.loggers.WandbLogger"],
    ["fit", "--trainer.plugins", "bf16-mixed", "--trainer.precision", "16-mixed"],
    ["fit", "--trainer.callbacks", '[{"class_path": "GPTQ", "init_args": {"bits": 4}}]'],
    ["study", "--P.class_path", "Wanda", "--P.sparsity=0.6", "--logger", "CSVLogger"],
    ["study", "--stages", "[{class_path: ppq_lightning.callbacks.SparseGPT}]"],
]


@pytest.mark.parametrize("argv", VALID, ids=lambda a: " ".join(a[1:])[:50])
def test_valid_class_paths_pass(argv):
    check_command_line(argv)


def test_the_class_paths_of_every_config_file_pass():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(configs) > 10
    for config in configs:
        check_command_line(["validate", "--config", str(config)])  # a file: the parser's
        check_command_line(["validate", "--config", config.read_text()])  # inline: walked


BAD = [
    (["fit", "--trainer.callbacks+=nopkg_ppq.Evil"], "--trainer.callbacks", "'nopkg_ppq'"),
    (["fit", "--model", "os; rm -rf x"], "--model", "'os; rm -rf x'"),
    (["fit", "--data=__import__('os')"], "--data", "__import__('os')"),
    (["fit", "--trainer.logger.class_path", "nopkg_ppq.Logger"], "--trainer.logger.class_path", ""),
    (["study", "--P.class_path=nopkg_ppq.Pruner"], "--P.class_path", "'nopkg_ppq.Pruner'"),
    (
        ["fit", "--trainer.callbacks", '[{"class_path": "a b"}]'],
        "--trainer.callbacks.class_path",
        "'a b'",
    ),
    (["fit", "--config", '{"model": {"class_path": "nopkg_ppq.M"}}'], "--model.class_path", ""),
    (["fit", "--trainer.strategy", "nopkg_ppq.Strategy"], "--trainer.strategy", ""),
    (["fit", "--model.help", "nopkg_ppq.M"], "--model.help", ""),
    (["study", "--stages", "[{class_path: 3}]"], "--stages.class_path", "3"),
]


@pytest.mark.parametrize(("argv", "argument", "value"), BAD, ids=lambda a: str(a)[:50])
def test_bad_class_paths_are_refused_naming_the_argument(argv, argument, value):
    with pytest.raises(PPQConfigError, match="is not allowed") as info:
        check_command_line(argv)
    message = str(info.value)
    assert message.startswith(f"{argument}=") and value in message


def test_an_installed_package_is_found_without_importing_it(probe):
    assert check_class_path("--model", "ppq_probe_package.Model") == "ppq_probe_package.Model"
    assert not probe.exists()


def test_the_cli_refuses_before_any_import(probe, tmp_path):
    with pytest.raises(PPQConfigError, match=r"--trainer.callbacks='ppq_probe_package.Bad-Name'"):
        main(["fit", "--trainer.callbacks+=ppq_probe_package.Bad-Name"])
    with pytest.raises(PPQConfigError, match=r"--Q.class_path='ppq_probe_package.X\(\)'"):
        main(["study", "--config", "x.yaml", "--Q.class_path", "ppq_probe_package.X()"])
    assert not probe.exists()


def test_the_message_says_which_package_is_missing():
    with pytest.raises(PPQConfigError, match="no package 'nopkg_ppq' is installed"):
        check_class_path("--model", "nopkg_ppq.Model")


@pytest.fixture
def evil_folder(tmp_path, monkeypatch):
    """The current folder holds ``evilmod.py`` (whose import leaves a marker) and is on
    ``sys.path`` as ``python -m`` / ``python -c`` put it there (its path, and ``''``)."""
    marker = tmp_path / "imported"
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: ...\n")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    yield folder, marker
    sys.modules.pop("evilmod", None)


def test_a_module_of_the_current_folder_is_refused_unimported(evil_folder):
    folder, marker = evil_folder
    with pytest.raises(PPQConfigError, match=r"'evilmod' is found only in the current folder"):
        check_class_path("--model", "evilmod.Model")
    with pytest.raises(PPQConfigError, match=r"--model.class_path='evilmod.Model'"):
        check_command_line(["fit", "--config", '{"model": {"class_path": "evilmod.Model"}}'])
    config = folder / "config.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: evilmod.Model\n")
    for option in (["--config", str(config)], ["-c", "config.yaml"]):
        with pytest.raises(PPQConfigError, match=r"--trainer.callbacks.class_path='evilmod"):
            check_command_line(["fit", *option])
    assert not marker.exists()


def test_a_folder_put_on_pythonpath_on_purpose_is_allowed(evil_folder, monkeypatch):
    folder, marker = evil_folder
    monkeypatch.setenv("PYTHONPATH", str(folder))
    assert check_class_path("--model", "evilmod.Model") == "evilmod.Model"
    assert not marker.exists()


def test_a_folder_of_the_current_folder_shadowing_an_installed_package_is_refused(
    probe, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    (work / "ppq_probe_package").mkdir(parents=True)
    (work / "ppq_probe_package" / "__init__.py").write_text("class Model: ...\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    with pytest.raises(PPQConfigError, match=r"of the current folder .* shadows the installed"):
        check_class_path("--model", "ppq_probe_package.Model")
    assert not probe.exists()


def test_this_project_installed_editable_is_allowed_from_its_own_folder(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", ["", str(ROOT), *sys.path])
    check_command_line(["fit", "--model", "ppq_lightning.models.CausalLMModule"])


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("this.Foo", "the module 'this' defines no 'Foo'"),
        ("this.s", "this.s is a literal value, not a class"),
        ("antigravity.webbrowser", "antigravity.webbrowser is a module, not a class"),
        ("antigravity.geohash", "antigravity.geohash is a function, not a class"),
        ("ppq_lightning.callbacks", "'ppq_lightning.callbacks' is a module, not a class"),
        ("ppq_lightning.callbacks.NoSuchStage", "'ppq_lightning.callbacks' defines no"),
    ],
)
def test_the_whole_path_is_checked_before_anything_is_imported(value, said):
    """``this.Foo`` imported ``this`` (printing the Zen of Python) before refusing; a module's
    source is read, not run, to find the class."""
    sys.modules.pop("this", None)
    sys.modules.pop("antigravity", None)
    with pytest.raises(PPQConfigError, match=re.escape(said)):
        check_command_line(["fit", f"--trainer.callbacks+={value}"])
    assert "this" not in sys.modules and "antigravity" not in sys.modules


@pytest.mark.parametrize(
    "value",
    [
        "lightning.pytorch.demos.Transformer",
        "lightning.pytorch.demos.boring_classes.BoringModel",
        "transformers.LlamaForCausalLM",
        "torch.optim.lr_scheduler.StepLR",
        "torchmetrics.Accuracy",
        "timm.models.resnet.ResNet",
        "lightning.pytorch.strategies.DDPStrategy",
    ],
)
def test_classes_of_installed_packages_pass(value):
    assert check_class_path("--model", value) == value
