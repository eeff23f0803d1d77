import json

import pytest

from ppq_lightning.cli.main import main
from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import load_compressed


def test_export_from_a_study_rebuilds_its_best_order(tmp_path):
    study = tmp_path / "study"
    main(["study", "--config", "configs/tiny/study.yaml", "--output_dir", str(study)])
    assert (study / "study.yaml").is_file()
    best = json.loads((study / "report.json").read_text())["studies"][0]["best_order"]
    manifest = main(
        [
            "export",
            "--from-study",
            str(study),
            "--order",
            "best",
            "--format",
            "ppq",
            "--path",
            str(tmp_path / "out"),
        ]
    )
    model = load_compressed(tmp_path / "out")
    stages = next(state.stages for _, _, state in compressed_modules(model))
    assert len(stages) == 2 and manifest["measured_C"] > 1
    # the order applied is the study's best one: P first iff "P" comes first in it
    assert stages[0].startswith("MagnitudePruning") == best.startswith("P")


def test_export_from_a_validate_config(tmp_path):
    manifest = main(
        [
            "export",
            "--config",
            "configs/tiny/llama_p_then_q.yaml",
            "--format",
            "compressed-tensors",
            "--path",
            str(tmp_path / "ct"),
        ]
    )
    assert (
        manifest["format"] == "compressed-tensors" and (tmp_path / "ct" / "config.json").is_file()
    )


def test_export_needs_exactly_one_source(tmp_path):
    with pytest.raises(PPQConfigError, match="exactly one of --ckpt, --from-study, --config"):
        main(["export", "--format", "ppq", "--path", str(tmp_path / "x")])
    with pytest.raises(PPQConfigError, match=r"holds no study\.yaml"):
        main(
            [
                "export",
                "--from-study",
                str(tmp_path),
                "--format",
                "ppq",
                "--path",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(PPQConfigError, match="--format='zip' is not allowed"):
        main(
            [
                "export",
                "--from-study",
                str(tmp_path),
                "--format",
                "zip",
                "--path",
                str(tmp_path / "x"),
            ]
        )
    assert not (tmp_path / "x").exists()


def test_ppq_fit_then_ppq_export_of_the_checkpoint_it_wrote(tmp_path):
    """#26 point 3: LightningCLI's keys in the hyperparameters broke `ppq export --ckpt`."""
    main(
        [
            "fit",
            "--config",
            "configs/tiny/llama_p_then_q.yaml",
            "--trainer.max_steps",
            "1",
            "--trainer.enable_checkpointing",
            "true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--report_dir",
            str(tmp_path),
        ]
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    manifest = main(
        ["export", "--ckpt", str(ckpt), "--format", "ppq", "--path", str(tmp_path / "x")]
    )
    assert manifest["measured_C"] > 1 and (tmp_path / "x" / "export.json").is_file()


def test_export_best_of_a_folder_of_several_studies_takes_the_latest(tmp_path):
    """ppq study keeps earlier studies' rows in the folder's report; study.yaml is the latest
    study's, so `--order best` is the latest study's best order (it was refused as ambiguous)."""
    study = tmp_path / "study"
    argv = ["study", "--config", "configs/tiny/study.yaml", "--curve_bits", "[]"]
    main([*argv, "--output_dir", str(study)])
    latest = main([*argv, "--output_dir", str(study), "--P.sparsity", "0.75"])
    assert len(json.loads((study / "report.json").read_text())["studies"]) == 2
    path = tmp_path / "out"
    main(
        [
            "export",
            "--from-study",
            str(study),
            "--order",
            "best",
            "--format",
            "ppq",
            "--path",
            str(path),
        ]
    )
    stages = next(state.stages for _, _, state in compressed_modules(load_compressed(path)))
    pruning = [s for s in stages if s.startswith("MagnitudePruning")]
    assert len(stages) == 2 and "0.75" in pruning[0]
    assert stages.index(pruning[0]) == latest.best_order.split(">").index("P")


TRAINING_STAGES = {
    "lora": None,  # the config's own LoRAFineTune
    "qat": {"class_path": "ppq_lightning.callbacks.QuantizationAwareTraining", "bits": 4},
    "codeq": {"class_path": "ppq_lightning.callbacks.DeadZoneQuantization", "bits": 4},
    "sqs": {"class_path": "ppq_lightning.callbacks.SQS", "bits": 4},
}


@pytest.mark.parametrize("training", sorted(TRAINING_STAGES))
def test_ppq_fit_checkpoints_taken_while_a_stage_trains_export(tmp_path, training):
    """#26 point 4: `ppq fit` of Q>L>P with checkpointing wrote a checkpoint while L trained (P
    fires when training ends) that `ppq export --ckpt` refused for LoRA ("no LoRAFineTune
    record"); it exports, as the model computed then, saying P had not fired."""
    from pathlib import Path

    import yaml

    from ppq_lightning.edits.training import MidFitCheckpointWarning

    config = yaml.safe_load(Path("configs/tiny/lora_orders.yaml").read_text())
    stages = config["trainer"]["callbacks"][0]["init_args"]["stages"]
    stage = TRAINING_STAGES[training]
    if stage is not None:  # the same schedule with another training stage named L
        stage = dict(stage)
        stages[-1] = {"class_path": stage.pop("class_path"), "init_args": {**stage, "name": "L"}}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    main(
        [
            "fit",
            "--config",
            str(tmp_path / "fit.yaml"),
            "--order",
            "Q>L>P",
            "--trainer.enable_checkpointing",
            "true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--report_dir",
            str(tmp_path),
        ]
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    method = stages[-1]["class_path"].rsplit(".", 1)[-1]
    said = f"before MagnitudePruning 'P' fired; it holds RTNQuantization 'Q', {method} 'L' \\(tr"
    with pytest.warns(MidFitCheckpointWarning, match=said):
        manifest = main(
            ["export", "--ckpt", str(ckpt), "--format", "ppq", "--path", str(tmp_path / "x")]
        )
    model = load_compressed(tmp_path / "x")
    recorded = {
        entry["name"] for _, _, state in compressed_modules(model) for entry in state.history
    }
    assert recorded == {"Q", "L"} and manifest["measured_C"] > 1
