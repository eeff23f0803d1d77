import pytest

from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.study import OrderStudy
from tests.helpers import TINY_LLAMA


def stages():
    return [MagnitudePruning(sparsity=0.6, name="P"), RTNQuantization(bits=2, name="Q")]


@pytest.mark.parametrize(
    ("predictor", "evaluations"), [("interference", 2), ("prune_first", 2), ("pih", 4)]
)
def test_predict_evaluates_only_the_chosen_order(tmp_path, tiny_data, predictor, evaluations):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    study = OrderStudy(
        module, tiny_data, stages(), search="predict", predictor=predictor, output_dir=tmp_path
    )
    result = study.run()
    assert list(result.orders) == [result.prediction["orders"][0]["order"]]
    assert len(result.prediction["orders"]) == 2  # every order ranked
    assert result.budget.evaluations == evaluations  # dense (+ singles for pih) + the chosen
    row = result.summary_row()
    assert row["predictor"] == predictor and row["predicted_order"] == result.best_order


def test_top_k_evaluates_k_orders(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    result = OrderStudy(
        module, tiny_data, stages(), search="predict", top_k=2, output_dir=tmp_path
    ).run()
    assert sorted(result.orders) == ["P>Q", "Q>P"] and result.budget.evaluations == 3


def test_predictor_errors(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    with pytest.raises(PPQConfigError, match="predictor='oracle' is not allowed"):
        OrderStudy(module, tiny_data, stages(), search="predict", predictor="oracle")
    with pytest.raises(PPQConfigError, match="needs a quantization curve"):
        OrderStudy(module, tiny_data, stages(), search="predict", predictor="pih_cer")
    with pytest.raises(PPQConfigError, match="top_k=0"):
        OrderStudy(module, tiny_data, stages(), search="predict", top_k=0)
    quantizers = [RTNQuantization(bits=8, name="Q8"), RTNQuantization(bits=4, name="Q4")]
    study = OrderStudy(
        module,
        tiny_data,
        quantizers,
        search="predict",
        predictor="prune_first",
        output_dir=tmp_path,
    )
    with pytest.raises(PPQConfigError, match="not a mix of the two"):
        study.run()


def test_pairwise_kl_ranks_n_stages_from_pairs_with_fewer_applications(tmp_path, tiny_data):
    """Three stages: 3 pairs of 4 applications each (a, a>b, b, b>a) against the 15 that every
    order needs with shared prefixes (3 + 6 + 6); a pair's ranking is calibration_kl's."""
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    three = [
        MagnitudePruning(sparsity=0.3, name="P1"),
        RTNQuantization(bits=3, name="Q"),
        MagnitudePruning(sparsity=0.6, name="P2"),
    ]
    result = OrderStudy(
        module, tiny_data, three, search="predict", predictor="pairwise_kl", output_dir=tmp_path
    ).run()
    cost = result.prediction["cost"]
    assert cost["pairs"] == 3 and cost["applications"] == 12 < 15
    assert len(result.prediction["orders"]) == 6 and cost["orders_scored"] == 6
    assert result.budget.evaluations == 2  # the dense model and the predicted order
    pair = OrderStudy(
        module, tiny_data, stages(), search="predict", predictor="pairwise_kl", output_dir=tmp_path
    ).run()
    kl = OrderStudy(
        module,
        tiny_data,
        stages(),
        search="predict",
        predictor="calibration_kl",
        output_dir=tmp_path,
    ).run()
    assert pair.prediction["orders"][0]["order"] == kl.prediction["orders"][0]["order"]
