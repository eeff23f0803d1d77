import pytest
import torch

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import JointStructuralMixedPrecision
from ppq_lightning.compressed.state import current_grid, get_state
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.order.interference import reference_score
from tests.bad_inputs.helpers import assert_refused
from tests.helpers import TINY_LLAMA, token_batches


def _lm():
    return CausalLMModule(model_config=TINY_LLAMA, seed=0)


def _search(**kwargs):
    arguments = {"bits": [8, 4, 3, 2], "keep": [1.0, 0.75, 0.5], "score_batches": 2}
    return JointStructuralMixedPrecision(**{**arguments, **kwargs})


@pytest.mark.parametrize("budget", [3.0, 5.0, 7.0])
def test_the_budget_is_met_in_measured_c(budget):
    module = _lm()
    stage = _search(budget=budget)
    result = stage.apply(module, dataloader=token_batches(3))
    assert budget <= result.summary.measured_C < budget * 1.25
    assert stage.search_log[-1]["C"] == pytest.approx(result.summary.measured_C)
    assert check_invariants(module) == 14
    kept = {m["keep"] for m in result.layers.values()}
    bits = {m["bits"] for m in result.layers.values()}
    assert len(bits) > 1 or len(kept) > 1  # a mixed configuration, not a uniform one
    layer = module.model.model.layers[0].mlp.down_proj
    entry = get_state(layer).history[-1]
    assert entry["kind"] == "PQ" and current_grid(layer).bits == entry["layer_bits"]


def test_the_less_sensitive_of_two_equal_layers_gets_the_fewer_bits():
    module = _lm()
    sensitive = module.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        sensitive.weight[:, 0] *= 40  # one outlier column: a 2-bit grid wipes out the rest
    targets = [r"layers\.0\.self_attn\.q_proj$", r"layers\.1\.self_attn\.q_proj$"]
    batches = token_batches(3)
    score = reference_score(module, batches[:2], "calibration_kl")
    alone = {}
    for i in (0, 1):  # each layer at 2 bits alone, measured as the search measures it
        copy = _lm()
        copy.load_state_dict(module.state_dict())
        stage = JointStructuralMixedPrecision(budget=1.5, bits=[2], keep=[1.0], targets=targets[i])
        stage.apply(copy, dataloader=batches)
        alone[i] = score(copy)
    assert alone[1] > alone[0]
    stage = _search(budget=3.0, bits=[8, 2], keep=[1.0], targets=targets)
    result = stage.apply(module, dataloader=batches)
    chosen = {name.split(".")[3]: m["bits"] for name, m in result.layers.items()}
    assert chosen == {"0": 2.0, "1": 8.0}


def test_a_checkpoint_of_the_result_loads_into_a_fresh_model():
    module = _lm()
    _search(budget=5.0).apply(module, dataloader=token_batches(3))
    fresh = _lm()
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict())
    for a, b in zip(module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    x = token_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(module(x), fresh(x))
    down = fresh.model.model.layers[1].mlp.down_proj
    assert (
        weight_matrix(down).shape == weight_matrix(module.model.model.layers[1].mlp.down_proj).shape
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 1.0}, "budget=1.0"),
        ({"budget": 4, "bits": [9]}, "bits=9"),
        ({"budget": 4, "bits": [4, 8]}, r"bits=\[4, 8\] .* largest first"),
        ({"budget": 4, "bits": []}, r"bits=\[\]"),
        ({"budget": 4, "keep": [0.5]}, r"keep=\[0.5\] .* starting at 1.0"),
        ({"budget": 4, "keep": [1.0, 0.0]}, "keep=0.0"),
        ({"budget": 4, "keep": [1.0, 0.5, 0.75]}, "largest first"),
        ({"budget": 4, "score_batches": 0}, "score_batches=0"),
        ({"budget": 4, "rescore_every": True}, "rescore_every=True"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        JointStructuralMixedPrecision(**kwargs)


def test_an_infeasible_budget_is_refused_before_any_weight_changes():
    module = _lm()
    assert_refused(
        lambda: _search(budget=100.0).apply(module, dataloader=token_batches(3)),
        PPQConfigError,
        r"budget=100.0 .*at most about \d+\.\d+",
        model=module,
    )


def test_keep_below_one_without_an_mlp_is_refused_before_any_weight_changes():
    module = _lm()
    assert_refused(
        lambda: _search(budget=3.0, targets=r"q_proj$").apply(module, dataloader=token_batches(3)),
        PPQConfigError,
        "keep below 1.0 needs MLPs",
        model=module,
    )


def test_the_search_is_a_stage_of_an_order_study(tmp_path, tiny_lm, tiny_data):
    from ppq_lightning.callbacks import RTNQuantization
    from ppq_lightning.study.engine import OrderStudy

    stages = [_search(budget=3.0, name="J"), RTNQuantization(bits=3, name="Q")]
    result = OrderStudy(tiny_lm, tiny_data, stages, output_dir=tmp_path).run()
    assert set(result.orders) == {"J>Q", "Q>J"}
    assert all(cell.measured_C >= 3.0 for cell in result.orders.values())


# -- CNNs: coupled channel groups from Torch-Pruning's dependency graph ------------------------
TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}


def _resnet():
    from ppq_lightning.models import ImageClassifierModule

    torch.manual_seed(0)
    return ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET)


def _images(n: int = 3):
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,)))
        for _ in range(n)
    ]


def _outputs(module, x):
    module.eval()
    with torch.no_grad():
        return module(x)


def test_a_cnn_search_removes_coupled_channels_and_meets_the_budget():
    module, batches = _resnet(), _images()
    before = sum(p.numel() for p in module.parameters())
    stage = _search(budget=6.0, bits=[8, 4, 3], keep=[1.0, 0.5], channels="depgraph")
    result = stage.apply(module, dataloader=batches)
    assert 6.0 <= result.summary.measured_C < 6.0 * 1.25
    assert sum(p.numel() for p in module.parameters()) < before  # channels really removed
    assert {m["keep"] for m in result.layers.values()} != {1.0}
    assert check_invariants(module) > 0
    _outputs(module, batches[0][0])  # the shrunk network still runs


def test_the_cnn_emulation_is_the_function_of_the_edited_model():
    """The search's last measured loss is the loss of the model it then edits for real."""
    module, batches = _resnet(), _images()
    score = reference_score(module, batches[:2], "calibration_kl")
    stage = _search(budget=5.0, bits=[8, 4], keep=[1.0, 0.5], channels="depgraph")
    stage.apply(module, dataloader=batches)
    assert score(module) == pytest.approx(stage.search_log[-1]["kl"], rel=1e-4, abs=1e-6)


def test_a_cnn_checkpoint_of_the_result_loads_into_a_fresh_model():
    module, batches = _resnet(), _images()
    _search(budget=5.0, bits=[8, 4], keep=[1.0, 0.5], channels="auto").apply(
        module, dataloader=batches
    )
    fresh = _resnet()
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict())
    x = batches[0][0]
    assert torch.equal(_outputs(module, x), _outputs(fresh, x))


def test_channels_must_be_a_known_kind():
    with pytest.raises(PPQConfigError, match="channels='heads'"):
        JointStructuralMixedPrecision(budget=4, channels="heads")
