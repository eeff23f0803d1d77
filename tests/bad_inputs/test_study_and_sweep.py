"""The catalogue, part study and sweep: each case is refused with a message naming the argument
and the value, before any file is written (the output folder stays as it was)."""

import pytest
import yaml

from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.sweep import agent_command, load_sweep, run_sweep
from tests.bad_inputs.helpers import assert_refused, names


def _stages():
    return [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")]


STUDIES = [
    ({"stages": []}, names("stages=[]", "non-empty list")),
    (
        {"stages": [MagnitudePruning(sparsity=0.5), MagnitudePruning(sparsity=0.3)]},
        "named 'magnitude'",
    ),
    ({"search": "all"}, names("search='all'", "exhaustive")),
    ({"search": "predict", "predictor": "oracle"}, names("predictor='oracle'", "calibration_kl")),
    ({"search": "predict", "top_k": 0}, "top_k=0"),
    ({"search": "predict", "top_k": True}, "top_k=True"),
    ({"search": "predict", "predictor": "pih_cer"}, names("pih_cer", "curve")),
    ({"order": "P>X"}, "X"),
    ({"order": ""}, "order=''"),
    ({"reuse_prefixes": "yes"}, "reuse_prefixes='yes'"),
    ({"higher_is_better": 1}, "higher_is_better=1"),
    ({"metric": 3}, "metric=3"),
    ({"label": ""}, "label=''"),
    ({"tail": [RTNQuantization(bits=8, name="Q")]}, "tail stage .* named 'Q'"),
]


@pytest.mark.parametrize(("arguments", "match"), STUDIES, ids=lambda v: str(v)[:40])
def test_bad_study_arguments(tmp_path, tiny_lm, tiny_data, arguments, match):
    arguments = {"stages": _stages(), "output_dir": tmp_path / "out", **arguments}
    stages = arguments.pop("stages")
    assert_refused(
        lambda: OrderStudy(tiny_lm, tiny_data, stages, **arguments).run(),
        PPQConfigError,
        match,
        model=tiny_lm,
        folder=tmp_path,
    )


@pytest.mark.parametrize("argument", ["output_dir", "cells_dir"])
def test_a_study_folder_that_is_a_file(tmp_path, tiny_lm, tiny_data, argument):
    (tmp_path / "taken").write_text("x")
    assert_refused(
        lambda: OrderStudy(tiny_lm, tiny_data, _stages(), **{argument: tmp_path / "taken"}),
        PPQConfigError,
        names(f"{argument}=", "taken", "is a file"),
        model=tiny_lm,
        folder=tmp_path,
    )


GRID = {"method": "grid", "parameters": {"order": {"values": ["P>Q"]}}}
SWEEPS = [
    ({**GRID, "method": "bayes"}, "method='bayes'"),
    ({"method": "grid"}, "`parameters` must map"),
    ({"method": "grid", "parameters": {"a": {"min": 0}}}, names("parameter 'a'", "values")),
    ({"method": "grid", "parameters": {"a": {"values": []}}}, names("parameter 'a'", "non-empty")),
    ({"method": "grid", "parameters": {"a": 3}}, names("parameter 'a'", "got 3")),
    ({**GRID, "command": ["ppq", "study", "${args_json_file}"]}, names("${args_json_file}", "not")),
    ({**GRID, "command": ["ppq", "predict", "${args}"]}, names("ppq predict", "must run one")),
    ({**GRID, "command": ["${program}", "study"]}, names("${program}", "no `program`")),
]


@pytest.mark.parametrize(("sweep", "match"), SWEEPS, ids=lambda v: str(v)[:40])
def test_bad_sweep_files(tmp_path, sweep, match):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert_refused(
        lambda: run_sweep(path, tmp_path / "out"), PPQConfigError, match, folder=tmp_path
    )


def test_a_missing_sweep_file(tmp_path):
    assert_refused(
        lambda: load_sweep(tmp_path / "nope.yaml"),
        PPQConfigError,
        names("nope.yaml", "does not exist"),
        folder=tmp_path,
    )


@pytest.mark.parametrize("taken", ["out", "out/points"])
def test_a_sweep_output_that_is_a_file(tmp_path, taken):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GRID, "command": ["ppq", "study", "${args}"]}))
    (tmp_path / taken).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / taken).write_text("x")
    assert_refused(
        lambda: run_sweep(path, tmp_path / "out"),
        PPQConfigError,
        names("--output=", "is a file"),
        folder=tmp_path,
    )


def test_agent_command_names_the_bad_macro():
    with pytest.raises(PPQConfigError, match=r"\$\{project\}"):
        agent_command({**GRID, "command": ["ppq", "study", "${project}"]}, {"order": "P>Q"})
