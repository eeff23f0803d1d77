import pytest
import torch

from ppq_lightning.callbacks import BlockRemoval, MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.order.interference import interference_ranking
from tests.helpers import TINY_LLAMA, token_batches


def test_pruning_after_a_two_level_grid_is_predicted_worse():
    """On a 2-bit grid, pruning afterwards can only pick among a few tied levels and the
    survivors stay where they are: the layer error of Q>P is far above that of P>Q."""
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    dense = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    stages = [MagnitudePruning(sparsity=0.6, name="P"), RTNQuantization(bits=2, name="Q")]
    ranking = interference_ranking(module, stages, token_batches(2))
    scores = dict(ranking.orders)
    assert ranking.top == ("P", "Q") and scores[("Q", "P")] > 1.1 * scores[("P", "Q")]
    assert ranking.cost["evaluations"] == 0 and ranking.cost["applications"] == 4
    after = module.state_dict()  # the dense model is never modified: every order ran on a copy
    assert after.keys() == dense.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in dense.items())


def test_three_stages_rank_every_permutation_with_prefixes_reused():
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [
        RTNQuantization(bits=8, name="Q8"),
        MagnitudePruning(sparsity=0.5, name="P"),
        RTNQuantization(bits=4, name="Q4"),
    ]
    ranking = interference_ranking(module, stages, token_batches(2))
    assert len(ranking.orders) == 6 and len({o for o, _ in ranking.orders}) == 6
    assert ranking.cost["applications"] == 3 + 6 + 6  # 3 prefixes of 1, 6 of 2, 6 of 3


def test_structural_stages_are_refused():
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [BlockRemoval(ratio=0.5, name="B", num_calibration_batches=1), RTNQuantization(bits=4)]
    with pytest.raises(PPQConfigError, match="predictor='interference' compares layers"):
        interference_ranking(module, stages, token_batches(1))


def test_calibration_kl_ranks_structural_stages_too():
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [BlockRemoval(ratio=0.5, name="B", num_calibration_batches=1), RTNQuantization(bits=2)]
    ranking = interference_ranking(module, stages, token_batches(1), score="calibration_kl")
    assert ranking.predictor == "calibration_kl" and len(ranking.orders) == 2
    assert all(score > 0 for _, score in ranking.orders)
    assert ranking.cost["calibration_forwards"] == 2 and ranking.cost["evaluations"] == 0
