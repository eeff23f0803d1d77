"""lm-eval-harness task metrics on the in-memory model: the local task, studies, errors."""

import copy
import json
import pickle

import lightning as L
import pytest
import torch

from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule, TaskEvaluation, lm_tasks
from ppq_lightning.study import OrderStudy, write_report
from tests.helpers import TINY_LLAMA

CLOZE = {"tasks": ["pydoc_cloze"], "limit": 3, "tokenizer": "bytes", "batch_size": 4}


@pytest.fixture
def cloze_lm():
    return CausalLMModule(model_config=TINY_LLAMA, seed=0, tasks=CLOZE)


def test_the_local_task_ships_real_held_out_passages():
    folder = lm_tasks.LOCAL_TASKS / "pydoc_cloze"
    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert len(rows) > 300
    for row in rows[:50]:  # a LAMBADA-style cloze: the target word occurs in its context
        assert row["target"].isalpha() and row["target"] in row["context"].lower()
    from pydoc_data.topics import topics

    corpus = " ".join(" ".join(topics.values()).split())
    assert not any(row["context"][:200] in corpus for row in rows)  # held out of pydoc


def test_evaluate_reports_the_task_next_to_perplexity(cloze_lm, tiny_data):
    metrics = cloze_lm.evaluate(tiny_data.val_dataloader())
    assert {"ppl", "loss", "pydoc_cloze/acc", "pydoc_cloze/perplexity"} <= set(metrics)
    assert 0 <= metrics["pydoc_cloze/acc"] <= 1 and metrics["pydoc_cloze/perplexity"] > 1
    assert cloze_lm.metric_names() == {
        "ppl": False,
        "loss": False,
        "pydoc_cloze/acc": True,
        "pydoc_cloze/perplexity": False,
    }


def test_the_harness_runs_on_the_model_in_memory(cloze_lm, monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    seen = []
    original = HFLM.__init__

    def spy(self, pretrained, **kwargs):
        seen.append(pretrained)
        original(self, pretrained=pretrained, **kwargs)

    def no_reload(*args, **kwargs):
        raise AssertionError("the harness must not load weights from disk")

    monkeypatch.setattr(HFLM, "__init__", spy)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_reload)
    before = cloze_lm.task_metrics()
    assert seen == [cloze_lm.model]
    with torch.no_grad():  # an in-memory change of the weights changes the task metric
        cloze_lm.model.get_output_embeddings().weight.mul_(3.0)
    after = cloze_lm.task_metrics()
    assert after["pydoc_cloze/perplexity"] != pytest.approx(before["pydoc_cloze/perplexity"])
    assert cloze_lm.training  # the module's mode is restored


def test_task_metrics_leave_the_global_random_state_alone(cloze_lm):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    cloze_lm.task_metrics()
    assert torch.equal(torch.rand(3), expected)


def test_validation_logs_the_task_metrics(cloze_lm, tiny_data):
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(cloze_lm, datamodule=tiny_data, verbose=False)
    assert {"val/ppl", "val/pydoc_cloze/acc", "val/pydoc_cloze/perplexity"} <= set(metrics)


def test_tasks_survive_hyperparameters_copies_and_pickles(cloze_lm):
    assert cloze_lm.hparams["tasks"] == TaskEvaluation(**CLOZE).config()
    rebuilt = CausalLMModule(**cloze_lm.hparams)  # what load_from_checkpoint does
    assert rebuilt.tasks == cloze_lm.tasks
    twin = copy.deepcopy(cloze_lm)
    assert twin.tasks is not cloze_lm.tasks and twin.tasks._manager is cloze_lm.tasks._manager
    assert pickle.loads(pickle.dumps(cloze_lm.tasks)).metric_names() == {
        "pydoc_cloze/acc": True,
        "pydoc_cloze/perplexity": False,
    }


@pytest.mark.parametrize(
    ("metric", "higher_is_better"), [("pydoc_cloze/acc", True), ("pydoc_cloze/perplexity", False)]
)
def test_a_study_compares_orders_by_a_task_metric_in_its_direction(
    cloze_lm, tiny_data, tmp_path, metric, higher_is_better
):
    study = OrderStudy(
        cloze_lm,
        tiny_data,
        [MagnitudePruning(name="P", sparsity=0.5), RTNQuantization(name="Q", bits=4)],
        metric=metric,
        output_dir=tmp_path,
    )
    assert study.higher_is_better is higher_is_better
    result = study.run()
    for cell in result.cells():
        assert cell.value == cell.metrics[metric]
        assert (cell.value if higher_is_better else -cell.value) == cell.M
        assert {"ppl", "pydoc_cloze/acc"} <= set(cell.metrics) and cell.eval_seconds > 0
    assert set(result.orders) == {"P>Q", "Q>P"}
    write_report([result], tmp_path / "report")  # tables and plots take the task metric
    rows = (tmp_path / "report" / "cells.csv").read_text().splitlines()
    assert "pydoc_cloze/acc" in rows[0].split(",")
    assert (tmp_path / "report" / "heatmap.png").stat().st_size > 0


def test_task_settings_are_part_of_the_cell_key(tiny_data, tmp_path):
    stages = [MagnitudePruning(name="P", sparsity=0.5)]

    def key(limit):
        lm = CausalLMModule(model_config=TINY_LLAMA, seed=0, tasks=CLOZE | {"limit": limit})
        return OrderStudy(lm, tiny_data, stages, output_dir=tmp_path).fingerprint

    plain = OrderStudy(
        CausalLMModule(model_config=TINY_LLAMA, seed=0), tiny_data, stages, output_dir=tmp_path
    )
    assert len({key(2), key(3), plain.fingerprint}) == 3


def test_a_metric_the_study_cannot_find_is_refused_before_any_work(cloze_lm, tiny_data, tmp_path):
    with pytest.raises(PPQConfigError, match=r"metric='pydoc_cloze/accuracy'.*pydoc_cloze/acc"):
        OrderStudy(
            cloze_lm,
            tiny_data,
            [MagnitudePruning(name="P", sparsity=0.5)],
            metric="pydoc_cloze/accuracy",
            output_dir=tmp_path / "study",
        )
    assert not (tmp_path / "study").exists()


def test_an_unknown_task_is_refused_with_close_names():
    with pytest.raises(PPQConfigError, match=r"tasks='pydoc_cloz'.*pydoc_cloze"):
        TaskEvaluation(tasks=["pydoc_cloz"])


def test_a_hub_task_offline_fails_fast_naming_it(monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lm_tasks, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PPQConfigError, match=r"'arc_challenge' needs the network.*allenai"):
        TaskEvaluation(tasks=["arc_challenge"])


def test_a_hub_task_with_the_hub_switched_off_names_it_too():
    # conftest sets HF_DATASETS_OFFLINE=1: datasets refuses at once, and we say why
    with pytest.raises(PPQConfigError, match=r"'arc_challenge' needs the network"):
        TaskEvaluation(tasks=["arc_challenge"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": []}, r"tasks=\[\] is not allowed"),
        ({"tasks": "pydoc_cloze"}, "tasks='pydoc_cloze' is not allowed"),
        ({"limit": 0}, "limit=0 is not allowed"),
        ({"limit": 1.5}, "limit=1.5 is not allowed"),
        ({"limit": True}, "limit=True is not allowed"),
        ({"batch_size": 0}, "batch_size=0 is not allowed"),
        ({"num_fewshot": -1}, "num_fewshot=-1 is not allowed"),
        ({"include_path": ["/no/such/folder"]}, "include_path=.* is not allowed"),
        ({"max_length": 1}, "max_length=1 is not allowed"),
    ],
)
def test_bad_task_arguments_are_refused(changes, message):
    with pytest.raises(PPQConfigError, match=message):
        TaskEvaluation(**(CLOZE | changes))


def test_a_wrapped_model_needs_a_tokenizer_for_its_tasks():
    wrapped = CausalLMModule.from_model(
        CausalLMModule(model_config=TINY_LLAMA).model, tasks=CLOZE | {"tokenizer": None}
    )
    with pytest.raises(PPQConfigError, match=r"tasks\.tokenizer"):
        wrapped.task_metrics()


def test_a_custom_task_over_local_json_files(tmp_path, tiny_lm):
    rows = [{"text": "the cat sat on the", "word": "mat"}, {"text": "one two", "word": "three"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mine.yaml").write_text(
        "task: my_cloze\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "output_type: loglikelihood\ntest_split: test\n"
        'doc_to_text: "{{text}}"\ndoc_to_target: "{{\' \' + word}}"\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    tasks = TaskEvaluation(tasks=["my_cloze"], include_path=[str(tmp_path)], tokenizer="bytes")
    lm = CausalLMModule.from_model(tiny_lm.model, tasks=tasks)
    assert set(lm.task_metrics()) == {"my_cloze/acc"}


def test_a_schedule_logs_the_task_metrics_of_every_stage(cloze_lm, tiny_data, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from ppq_lightning.callbacks import CompressionSchedule
    from tests.helpers import make_trainer

    schedule = CompressionSchedule(
        stages=[MagnitudePruning(name="P", sparsity=0.5), RTNQuantization(name="Q", bits=4)],
        evaluate_each_stage=True,
    )
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(tmp_path, [schedule], logger=logger).validate(cloze_lm, datamodule=tiny_data)
    rows = schedule.rows()
    assert all("pydoc_cloze/acc" in row for row in rows)
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert {"stage/0_dense/pydoc_cloze/acc", "stage/2_Q/pydoc_cloze/perplexity"} <= set(
        header.split(",")
    )
