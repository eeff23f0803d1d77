import csv
import json
from pathlib import Path

import pytest
import torch

from ppq_lightning.callbacks import GPTQ
from ppq_lightning.cli import main
from ppq_lightning.cli.study import apply_overrides, check_curve_bits, split_overrides
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.loggers import WandbLogger
from ppq_lightning.models import CausalLMModule

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny" / "study.yaml")


def test_ppq_study_runs_a_config_and_writes_the_report(tmp_path):
    result = main(
        ["study", "--config", CONFIG, "--curve_bits", "[8, 2]", "--output_dir", str(tmp_path)]
    )
    assert set(result.orders) == {"P>Q", "Q>P"} and len(result.curve) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["studies"][0]["best_order"] == result.best_order
    assert (tmp_path / "studies.md").exists() and (tmp_path / "heatmap.png").exists()


def test_ppq_study_compares_orders_by_a_task_metric_from_the_yaml(tmp_path):
    tasks = "{tasks: [pydoc_cloze], limit: 2, tokenizer: bytes}"
    argv = ["study", "--config", CONFIG, "--model.init_args.tasks", tasks]
    result = main([*argv, "--metric", "pydoc_cloze/acc", "--output_dir", str(tmp_path)])
    assert result.metric == "pydoc_cloze/acc"
    assert result.dense.value == result.dense.M  # accuracy: higher is better, as declared
    assert "pydoc_cloze/acc" in (tmp_path / "studies.md").read_text()
    with pytest.raises(PPQConfigError, match="metric='pydoc_cloze/f1' is not allowed"):
        main([*argv, "--metric", "pydoc_cloze/f1", "--output_dir", str(tmp_path / "x")])


def test_stage_overrides_change_arguments_and_methods():
    rest, overrides = split_overrides(
        ["--config", "x.yaml", "--P.sparsity=0.7", "--Q.bits", "3", "--data.seqlen", "8"]
    )
    assert rest == ["--config", "x.yaml", "--data.seqlen", "8"]  # the parser's own nested args
    assert overrides == [("P", "sparsity", "0.7"), ("Q", "bits", "3")]
    stages = [
        {
            "class_path": "ppq_lightning.callbacks.MagnitudePruning",
            "init_args": {"name": "P", "sparsity": 0.5, "scope": "layer", "ramp": {"end_step": 9}},
        },
        {
            "class_path": "ppq_lightning.callbacks.RTNQuantization",
            "init_args": {"name": "Q", "bits": 4},
        },
    ]
    apply_overrides(stages, [*overrides, ("P", "class_path", "Wanda")])
    # what was set is kept when Wanda takes it (sparsity); MagnitudePruning's default scope
    # ('layer', as a parsed config holds it) is not carried over: Wanda's own ('row') applies;
    # what Wanda does not take is dropped (ramp)
    assert stages[0]["init_args"] == {"name": "P", "sparsity": 0.7}
    assert stages[0]["class_path"] == "ppq_lightning.callbacks.wanda.Wanda"
    assert stages[1]["init_args"]["bits"] == 3
    with pytest.raises(PPQConfigError, match="no stage is named 'X'; named stages: P, Q"):
        apply_overrides(stages, [("X", "bits", "3")])
    with pytest.raises(PPQConfigError, match="RTNQuantization has no argument 'sparsity'"):
        apply_overrides(stages, [("Q", "sparsity", "0.5")])
    with pytest.raises(PPQConfigError, match="is not a compression callback"):
        apply_overrides(stages, [("Q", "class_path", "Nothing")])
    with pytest.raises(PPQConfigError, match="needs a value"):
        split_overrides(["--P.sparsity"])


def test_a_stage_class_override_applies_first_and_names_what_the_class_needs():
    def stages():
        return [
            {
                "class_path": "ppq_lightning.callbacks.MagnitudePruning",
                "init_args": {"name": "P", "sparsity": 0.5, "scope": "layer", "ramp": None},
            }
        ]

    swapped = stages()  # the argument of the new class before the class: same result
    apply_overrides(swapped, [("P", "num_calibration_batches", "2"), ("P", "class_path", "wanda")])
    assert swapped[0]["init_args"] == {"name": "P", "sparsity": 0.5, "num_calibration_batches": 2}
    assert swapped[0]["class_path"] == "ppq_lightning.callbacks.wanda.Wanda"  # a registry name
    unsized = stages()  # GPTQ's bits may come from a format: the stage itself says what it needs
    apply_overrides(unsized, [("P", "class_path", "gptq")])
    with pytest.raises(PPQConfigError, match=r"bits=None .*2 to 8 .*or a format .*nvfp4"):
        GPTQ(**{k: v for k, v in unsized[0]["init_args"].items()})
    given = stages()
    apply_overrides(given, [("P", "class_path", "gptq"), ("P", "bits", "3")])
    assert given[0]["init_args"]["bits"] == 3


def test_a_bad_order_on_the_command_line_is_a_clear_error(tmp_path):
    with pytest.raises(PPQConfigError, match="names 'X', which is not a configured stage"):
        main(["study", "--config", CONFIG, "--order", "P>X", "--output_dir", str(tmp_path)])


def test_study_streams_cells_table_and_plots_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(project="ppq-test", save_dir=str(tmp_path))
    from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
    from ppq_lightning.cli.study import run_study
    from ppq_lightning.datamodules import TextDataModule
    from ppq_lightning.models import CausalLMModule
    from tests.helpers import TINY_LLAMA

    data = TextDataModule(source="pydoc", tokenizer="bytes", seqlen=64, max_eval_windows=2)
    stages = [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")]
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    result = run_study(
        module, data, stages, curve_bits=[4], output_dir=str(tmp_path / "s"), logger=logger
    )
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    expected = {
        "result/ppl",
        "result/A",
        "result/G",
        "result/pih_correct",
        f"study/{result.label}/P>Q/ppl",
        f"study/{result.label}/cells",
        f"study/{result.label}/plots",
    }
    assert expected <= set(summary), sorted(summary)
    assert summary["result/ppl"] == pytest.approx(result.orders[result.best_order].value)
    runs = list(Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_curve_bits_are_checked_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PPQConfigError, match=r"curve_bits=\[16, 4\] is not allowed.*16 is not"):
        main(["study", "--config", CONFIG, "--curve_bits", "[16, 4]", "--output_dir", str(out)])
    assert not out.exists()  # no study.yaml, no cell


@pytest.mark.parametrize(
    ("bits", "b_orig", "match"),
    [
        ([8, 8], 16, "8 repeats"),
        ([1], 16, "1 is not"),
        ([True], 16, "True is not"),
        ([8], 8, "from 2 to 7"),
        ("8", 16, "curve_bits='8'"),
    ],
)
def test_check_curve_bits(bits, b_orig, match):
    with pytest.raises(PPQConfigError, match=match):
        check_curve_bits(bits, b_orig)
    assert check_curve_bits(None) == [8, 6, 5, 4, 3, 2] and check_curve_bits([], 8) == []


def test_a_missing_data_file_is_a_clear_error(tmp_path):
    config = tmp_path / "files.yaml"
    text = Path(CONFIG).read_text().replace("source: pydoc", "source: files, paths: [/nope]")
    config.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(PPQConfigError, match=r"paths=\['/nope'\] is not allowed"):
        main(["study", "--config", str(config), "--output_dir", str(out)])
    with pytest.raises(PPQConfigError, match=r"paths=\['/nope/b.txt'\] is not allowed"):
        data = ["--data.init_args.source", "files", "--data.init_args.paths", "[/nope/b.txt]"]
        main(["study", "--config", CONFIG, "--output_dir", str(out), *data])
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--search", "all"], "search='all'"),
        (["--predictor", "oracle"], "predictor='oracle'"),
        (["--top_k", "0"], "top_k=0"),
        (["--order", "P>X"], "names 'X'"),
    ],
)
def test_study_arguments_are_checked_before_anything_is_written(tmp_path, argv, match):
    out = tmp_path / "out"
    with pytest.raises(PPQConfigError, match=match):
        main(["study", "--config", CONFIG, "--output_dir", str(out), *argv])
    assert not out.exists()


def test_ppq_study_prints_its_cells_best_order_and_files(tmp_path, capsys, monkeypatch):
    """`ppq study` printed only a progress bar: the best order and the table were in files."""
    monkeypatch.setenv("COLUMNS", "120")
    argv = ["study", "--config", CONFIG, "--curve_bits", "[8]", "--output_dir", str(tmp_path)]
    result = main(argv)
    lines = capsys.readouterr().out.splitlines()
    for cell in result.cells():  # one table row per cell: its order, kind and metric
        best = [result.orders[order] for order in result.best_order.split("=")]
        kind = "best" if any(cell is b for b in best) else cell.kind
        row = [cell.order, kind, f"{cell.value:.4g}"]
        assert [line for line in lines if line.split()[:3] == row], (row, lines)
    best = f"best order: {result.best_order} (ppl {result.best.value:.4g}, measured C "
    assert [line for line in lines if line.startswith(best)]
    assert f"PIH order: {result.pih_order} (" in "\n".join(lines)
    report = next(line for line in lines if line.startswith("report (1 study): "))
    assert str(tmp_path) in report and "studies.md" in report and "report.json" in report
    assert f"cells: {tmp_path / 'cells'}/" in lines


def test_a_second_ppq_study_in_the_folder_keeps_the_first_ones_row(tmp_path, capsys):
    """A second study in the same output folder dropped the first one's row."""
    argv = ["study", "--config", CONFIG, "--curve_bits", "[]", "--output_dir", str(tmp_path)]
    first = main(argv)
    second = main([*argv, "--P.sparsity", "0.75", "--label", "P75"])
    main(argv)  # the first study again: its row is replaced, not added
    with open(tmp_path / "studies.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["study"] for r in rows] == [first.label, "P75"]
    assert [r["best_order"] for r in rows] == [first.best_order, second.best_order]
    assert "report (2 studies)" in capsys.readouterr().out


def test_under_wandb_agent_each_run_reports_into_its_own_folder(tmp_path, monkeypatch):
    """Every point of a sweep wrote its report into the same output_dir (the last one won);
    the points still share the cells."""
    argv = ["study", "--config", CONFIG, "--curve_bits", "[]", "--output_dir", str(tmp_path)]
    for run, order in (("run1", "P>Q"), ("run2", "Q>P")):
        monkeypatch.setenv("WANDB_RUN_ID", run)
        main([*argv, "--order", order])
    for run, order in (("run1", "P>Q"), ("run2", "Q>P")):
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert report["studies"][0]["best_order"] == order  # its only order
        assert (tmp_path / run / "study.yaml").exists()
    assert not (tmp_path / "report.json").exists()
    second = json.loads((tmp_path / "run2" / "report.json").read_text())["studies"][0]
    assert second["cached"] > 0  # the dense model and single stages of run1, read again


class UnseededLM(CausalLMModule):
    """A module whose weights come from the global RNG when it is built, as a user's do."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter))


def test_the_seed_is_set_before_the_model_is_built(tmp_path, monkeypatch):
    """``ppq study --seed`` seeds the building of the model: two runs of one config study the
    same random weights (it seeded after building, so each run had another dense model)."""
    monkeypatch.chdir(tmp_path)  # `tests` is imported from sys.path, never the current folder
    text = (
        Path(CONFIG)
        .read_text()
        .replace("ppq_lightning.models.CausalLMModule", "tests.cli.test_study.UnseededLM")
    )
    config = tmp_path / "unseeded.yaml"
    config.write_text(text)
    dense = [
        main(
            ["study", "--config", str(config), "--order", "P>Q", "--output_dir", str(tmp_path / d)]
        ).dense.value
        for d in ("a", "b")
    ]
    assert dense[0] == dense[1]
