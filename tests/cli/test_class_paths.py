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
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
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
