import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from ppq_lightning import check_invariants
from ppq_lightning.cli import main

CONFIG = Path(__file__).parents[2] / "configs" / "tiny" / "llama_p_then_q.yaml"


def test_validate_runs_a_yaml_schedule_end_to_end(tmp_path):
    cli = main(
        ["validate", "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    )
    run_dir = tmp_path / "tiny_llama_p_then_q" / "version_0"
    report = json.loads((run_dir / "schedule.json").read_text())
    assert report["order"] == "P>Q"
    assert [row["stage"] for row in report["stages"]] == ["0_dense", "1_P", "2_Q"]
    assert report["stages"][1]["sparsity"] == pytest.approx(0.5)
    assert (run_dir / "metrics.csv").exists() and (run_dir / "config.yaml").exists()
    assert check_invariants(cli.model) == 14


def test_bad_value_in_yaml_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace('pattern: "2:4"', 'pattern: "3:2"'))
    with pytest.raises((SystemExit, ValueError)) as info:
        main(
            ["validate", "--config", str(bad), "--trainer.logger.init_args.save_dir", str(tmp_path)]
        )
    assert "pattern='3:2' is not allowed" in str(info.value) + capsys.readouterr().err
    assert not (tmp_path / "tiny_llama_p_then_q").exists()  # nothing half-written


def test_order_flag_reorders_the_schedule_in_fit(tmp_path):
    config = CONFIG.parent / "lora_orders.yaml"
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path)]  # nothing under outputs/
    main(["fit", "--config", str(config), "--order", "Q>L>P", "--report_dir", str(tmp_path), *logs])
    report = json.loads((tmp_path / "schedule.json").read_text())
    assert report["order"] == "Q>L>P"
    assert [row["stage"] for row in report["stages"]] == ["0_dense", "1_Q", "2_L", "3_P"]


def test_order_flag_without_a_schedule_is_refused(tmp_path):
    from ppq_lightning.errors import PPQConfigError

    config = tmp_path / "plain.yaml"
    text = CONFIG.read_text()
    config.write_text(text.split("  callbacks:")[0] + text[text.index("model:") :])
    with pytest.raises(PPQConfigError, match="need a CompressionSchedule"):
        main(["validate", "--config", str(config), "--order", "P>Q"])


def test_validate_with_no_validation_batches_exits_non_zero(tmp_path, monkeypatch, capsys):
    from ppq_lightning.cli import entry

    argv = ["validate", "--config", str(CONFIG), "--trainer.limit_val_batches", "0"]
    argv += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["ppq", *argv])
    with pytest.raises(SystemExit) as info:
        entry()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "ppq: error: compression was configured but never applied in `validate`" in err
    assert "'P' (MagnitudePruning, in CompressionSchedule)" in err
    assert "limit_val_batches=0" in err
    assert not list(tmp_path.rglob("schedule.json"))  # no report of a dense model


def test_no_warning_about_args_beside_sys_argv(tmp_path, monkeypatch, capsys):
    """`ppq` passes the command line it read from sys.argv to LightningCLI as `args`."""
    argv = ["validate", "--config", str(CONFIG), "--print_config"]
    monkeypatch.setattr(sys, "argv", ["ppq", *argv])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as info:
        warnings.simplefilter("always")
        main()
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert "class_path: ppq_lightning.callbacks.CompressionSchedule" in captured.out
    messages = [str(w.message) for w in caught] + [captured.err]
    assert not [m for m in messages if "args parameter" in m], messages


def test_a_constructor_error_is_raised_as_itself(tmp_path):
    from ppq_lightning.errors import PPQConfigError

    argv = ["validate", "--config", str(CONFIG), "--data.init_args.source", "files"]
    argv += ["--data.init_args.paths", "[/nope/corpus.txt]"]
    with pytest.raises(PPQConfigError, match=r"paths=\['/nope/corpus.txt'\] is not allowed"):
        main([*argv, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_two_identical_stages_get_our_message_before_the_trainer_is_built(tmp_path, capsys):
    stage = '{"class_path": "ppq_lightning.callbacks.RTNQuantization", "init_args": {"bits": 4}}'
    argv = [
        "validate",
        "--config",
        str(CONFIG),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    with pytest.raises((SystemExit, ValueError)) as info:
        main([*argv, f"--trainer.callbacks+={stage}", f"--trainer.callbacks+={stage}"])
    message = str(info.value) + capsys.readouterr().err
    assert "set `name=` on each" in message and "state_key` must be unique" not in message
    assert not (tmp_path / "tiny_llama_p_then_q").exists()


SUBCOMMANDS = ["fit", "validate", "test", "predict", "study", "sweep", "export"]
ROOT = Path(__file__).parents[2]


def _help(argv: list[str], capsys) -> str:
    """What ``ppq ARGV --help`` prints (a subcommand's parser exits 0 after printing)."""
    try:
        main([*argv, "--help"])
    except SystemExit as done:
        assert done.code == 0
    return capsys.readouterr().out


def test_help_lists_every_subcommand_with_one_line(capsys, monkeypatch):
    """`ppq --help` listed neither study nor sweep nor export."""
    monkeypatch.setenv("COLUMNS", "80")
    text = _help([], capsys)
    listed = {}
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if line.startswith("    ") and words and words[0] in SUBCOMMANDS:
            listed[words[0]] = words[1] if len(words) > 1 else ""
    assert list(listed) == SUBCOMMANDS
    assert all(description.endswith(".") for description in listed.values()), listed
    assert listed["test"] == "Perform one evaluation epoch over the test set."


@pytest.mark.parametrize("argv", [["stdy"], []])
def test_an_unknown_or_missing_subcommand_names_every_subcommand(argv):
    from ppq_lightning.errors import PPQConfigError

    with pytest.raises(PPQConfigError, match=", ".join(SUBCOMMANDS)):
        main(argv)


def test_every_config_a_help_text_cites_exists(capsys):
    """`ppq study --help` cited configs/study/smollm2_sparsegpt_gptq.yaml, which does not
    exist: every `configs/...` path in the help of ppq and of each subcommand must."""
    cited = {}
    for argv in [[], *([name] for name in SUBCOMMANDS)]:
        for path in re.findall(r"configs/[\w./-]*\w", _help(argv, capsys)):
            cited.setdefault(path, " ".join(["ppq", *argv, "--help"]))
    assert {"ppq study --help", "ppq sweep --help", "ppq export --help"} <= set(cited.values())
    missing = {path: where for path, where in cited.items() if not (ROOT / path).is_file()}
    assert not missing, f"help texts cite configs that do not exist: {missing}"


def test_with_the_wandb_logger_config_each_run_has_its_own_folder(tmp_path, monkeypatch):
    """`configs/loggers/wandb.yaml` put config.yaml and schedule.json/csv into `outputs/`
    itself (Trainer.log_dir is a W&B logger's save_dir), overwritten by every run."""
    import wandb

    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)  # the runs go to outputs/ of the working directory
    logger_config = CONFIG.parents[1] / "loggers" / "wandb.yaml"
    runs = []
    for _ in range(2):
        cli = main(["validate", "--config", str(CONFIG), "--config", str(logger_config)])
        runs.append(cli.trainer.logger.experiment.id)
        wandb.finish()
    outputs = tmp_path / "outputs"
    assert not {"config.yaml", "schedule.json", "schedule.csv"} & {
        p.name for p in outputs.iterdir()
    }
    for run in runs:  # what Lightning's checkpoints of this logger use: save_dir/project/run id
        folder = outputs / "ppq-lightning" / run
        assert json.loads((folder / "schedule.json").read_text())["order"] == "P>Q"
        assert (folder / "schedule.csv").exists()
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["trainer"]["logger"]["class_path"] == "ppq_lightning.loggers.WandbLogger"
        # the CSVLogger's save_dir and name of the first config did not carry over
        assert config["trainer"]["logger"]["init_args"]["save_dir"] is None
    assert len(list((outputs / "wandb").glob("offline-run-*"))) == 2
