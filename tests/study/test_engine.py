import csv
import json

import pytest

from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.order.metrics import compression_equivalence_ratio
from ppq_lightning.study.engine import OrderStudy
from ppq_lightning.study.report import write_report


def _stages(q_bits=3):
    return [MagnitudePruning(sparsity=0.5, name="P"), RTNQuantization(bits=q_bits, name="Q")]


CURVE = [RTNQuantization(bits=b, name=f"RTN{b}") for b in (8, 4, 2)]


def test_exhaustive_study_on_a_tiny_model(tmp_path, tiny_lm, tiny_data):
    study = OrderStudy(tiny_lm, tiny_data, _stages(), curve=CURVE, output_dir=tmp_path)
    result = study.run()
    assert all(get_state(m) is None for m in tiny_lm.modules())  # the dense module is untouched
    assert set(result.orders) == {"P>Q", "Q>P"}
    m = {o: c.M for o, c in result.orders.items()}
    assert max(m, key=m.get) in result.best_order.split("=")  # "P>Q=Q>P" on an exact tie
    assert result.pair["A"] == pytest.approx(m["P>Q"] - m["Q>P"])
    assert result.pair["G"] == pytest.approx(result.singles["P"].M - result.singles["Q"].M)
    assert result.orders["P>Q"].nominal_C == pytest.approx(2 * 16 / 3)
    weaker_first = "P>Q" if result.singles["P"].M > result.singles["Q"].M else "Q>P"
    assert result.pih_order == weaker_first
    assert result.pih_correct == (result.pih_order in result.best_order.split("="))
    # C* is interpolated on (1, M_dense) and the curve's (16 / bits, M) points
    points = [(1.0, result.dense.M)] + [(16 / c.avg_bits, c.M) for c in result.curve]
    for name, cell in result.singles.items():
        assert result.cer[name] == compression_equivalence_ratio(points, cell.M)
    assert result.pair["C*_P - C_Q"] == pytest.approx(result.cer["P"] - 16 / 3)
    # dense + 2 singles + 3 curve points + 2 orders; prefix reuse saves re-applying P and Q
    assert result.budget.evaluations == 8 and result.budget.cached == 0
    assert result.budget.applications == 7 and result.budget.applications_without_reuse == 9


def test_pih_search_evaluates_only_the_predicted_order(tmp_path, tiny_lm, tiny_data):
    exhaustive = OrderStudy(tiny_lm, tiny_data, _stages(), curve=[], output_dir=tmp_path / "e")
    pih = OrderStudy(
        tiny_lm, tiny_data, _stages(), curve=[], search="pih", output_dir=tmp_path / "p"
    )
    full, predicted = exhaustive.run(), pih.run()
    assert list(predicted.orders) == [full.pih_order]
    # the same cells give the same numbers in both modes
    assert predicted.orders[full.pih_order].value == pytest.approx(
        full.orders[full.pih_order].value
    )
    assert predicted.pih_correct is None and predicted.budget.evaluations == 4
    assert full.budget.evaluations == 5


def test_restarted_study_recomputes_nothing(tmp_path, tiny_lm, tiny_data):
    first = OrderStudy(tiny_lm, tiny_data, _stages(), curve=CURVE[:1], output_dir=tmp_path).run()
    again = OrderStudy(tiny_lm, tiny_data, _stages(), curve=CURVE[:1], output_dir=tmp_path).run()
    assert again.budget.evaluations == 0 and again.budget.applications == 0
    assert again.budget.cached == first.budget.evaluations == 6
    assert again.orders["Q>P"] == first.orders["Q>P"]
    # another intensity in the same folder shares dense, P alone and the curve
    other = OrderStudy(tiny_lm, tiny_data, _stages(q_bits=8), curve=CURVE[:1], output_dir=tmp_path)
    assert other.run().budget.evaluations == 2  # the two orders: Q8 alone is the RTN8 curve cell
    # cells of another model (or other data) in the same folder are never reused
    from ppq_lightning.models import CausalLMModule
    from tests.helpers import TINY_LLAMA

    reseeded = CausalLMModule(model_config=TINY_LLAMA, seed=1)
    fresh = OrderStudy(reseeded, tiny_data, _stages(), curve=CURVE[:1], output_dir=tmp_path).run()
    assert fresh.budget.cached == 0 and fresh.budget.evaluations == 6


def test_without_prefix_reuse_every_order_starts_from_dense(tmp_path, tiny_lm, tiny_data):
    stages = [*_stages(), RTNQuantization(bits=8, name="Q8")]
    with_reuse = OrderStudy(tiny_lm, tiny_data, stages, curve=[], output_dir=tmp_path / "a").run()
    without = OrderStudy(
        tiny_lm, tiny_data, stages, curve=[], output_dir=tmp_path / "b", reuse_prefixes=False
    ).run()
    assert without.budget.applications == without.budget.applications_without_reuse == 3 + 18
    assert with_reuse.budget.applications == 3 + 6 + 6  # singles, then 2nd and 3rd stages
    for order, cell in with_reuse.orders.items():
        assert cell.value == pytest.approx(without.orders[order].value, rel=1e-5)
    assert len(with_reuse.orders) == 6 and "pair" not in with_reuse.summary_row()


def test_report_files_exist_and_parse(tmp_path, tiny_lm, tiny_data):
    results = [
        OrderStudy(
            tiny_lm,
            tiny_data,
            _stages(bits),
            curve=CURVE,
            output_dir=tmp_path,
            label=f"P50_Q{bits}",
        ).run()
        for bits in (2, 8)
    ]
    folder = write_report(results, tmp_path / "report")
    with open(folder / "studies.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["study"] for r in rows] == ["P50_Q2", "P50_Q8"]
    assert {"A", "G", "C*_P - C_Q", "best_order", "pih_order"} <= set(rows[0])
    report = json.loads((folder / "report.json").read_text())
    assert report["pih_hits"]["studies"] == 2 and len(report["cells"]) == 2 * 8
    assert (folder / "studies.md").read_text().startswith("| study |")
    for name in ("advantage_vs_gap.png", "advantage_vs_cer.png", "heatmap.png"):
        assert (folder / name).stat().st_size > 1000


def test_bad_studies_are_clear_errors(tmp_path, tiny_lm, tiny_data):
    with pytest.raises(PPQConfigError, match="two stages are named 'rtn'"):
        OrderStudy(tiny_lm, tiny_data, [RTNQuantization(bits=4), RTNQuantization(bits=8)])
    with pytest.raises(PPQConfigError, match="search='all'"):
        OrderStudy(tiny_lm, tiny_data, _stages(), search="all")
    with pytest.raises(PPQConfigError, match="stage name 'P50%' cannot appear in an order"):
        OrderStudy(tiny_lm, tiny_data, [MagnitudePruning(sparsity=0.5, name="P50%")])
    with pytest.raises(PPQConfigError, match="non-empty list"):
        OrderStudy(tiny_lm, tiny_data, [])
    with pytest.raises(PPQConfigError, match=r"metric='acc' is not allowed: .* loss, ppl"):
        OrderStudy(tiny_lm, tiny_data, _stages(), metric="acc", output_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()  # refused before any work
    (tmp_path / "file").write_text("")
    for argument in ("output_dir", "cells_dir"):
        with pytest.raises(PPQConfigError, match=f"{argument}='.*file/x'.*'.*file' is a file"):
            OrderStudy(tiny_lm, tiny_data, _stages(), **{argument: tmp_path / "file" / "x"})
