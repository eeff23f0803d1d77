import json

import pytest

from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.state import get_state
from ppq_lightning.study import OrderStudy


def test_order_study_on_a_tiny_model(tmp_path, tiny_lm, tiny_data):
    study = OrderStudy(
        tiny_lm,
        tiny_data,
        output_dir=tmp_path,
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
    )
    pruning = MagnitudePruning(sparsity=0.5, name="P")
    results = study.study(
        [
            (pruning, RTNQuantization(bits=2, name="Q2")),
            (pruning, RTNQuantization(bits=8, name="Q8")),
        ]
    )
    assert len(study.runs) == 8  # dense and P alone are shared by both pairs
    assert all(get_state(m) is None for m in tiny_lm.modules())  # the dense module is untouched
    for r in results:
        assert r.advantage == pytest.approx(r.second_then_first - r.first_then_second)
        assert r.gap == pytest.approx(r.second_alone - r.first_alone)
        assert r.best_order in ("P>" + r.second, r.second + ">P")
        weaker_first = "P" if r.first_alone < r.second_alone else r.second
        assert r.pih_order.startswith(weaker_first)
        assert r.pih_correct == (r.pih_order == r.best_order)
        assert r.nominal_C == pytest.approx(2 * 16 / int(r.second[1:]))
    report = json.loads((tmp_path / "order_study.json").read_text())
    assert len(report["pairs"]) == 2 and len(report["runs"]) == 8
    assert (tmp_path / "order_study.png").stat().st_size > 0
    assert (tmp_path / "order_study.csv").read_text().count("\n") == 3


def test_stages_with_one_label_need_names(tiny_lm, tiny_data, tmp_path):
    study = OrderStudy(tiny_lm, tiny_data, output_dir=tmp_path)
    with pytest.raises(PPQConfigError, match="distinct `name`"):
        study.compare(RTNQuantization(bits=4), RTNQuantization(bits=8))
