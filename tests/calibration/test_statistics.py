"""LayerStatistics (ppq_lightning.calibration.statistics): per-layer Hessians and input norms,
shared between layers fed one tensor, against direct formulas."""

import re

import pytest
import torch
from torch import nn

from ppq_lightning.calibration import statistics
from ppq_lightning.calibration.statistics import LayerStatistics, check_statistics_dtype
from ppq_lightning.errors import PPQConfigError


def _inputs(n_batches=3, seed=0):
    """Batches of (2, 5, 4) layer inputs: 10 rows of 4 features each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 4, generator=g) for _ in range(n_batches)]


def _rows(batches):
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in batches]).double()


def _counting(monkeypatch, statistic="hessian"):
    """Replace ``ACCUMULATORS[statistic]`` by a wrapper recording each call's dtype."""
    calls = []
    original = statistics.ACCUMULATORS[statistic]

    def counted(acc, x, n_seen, dtype):
        calls.append(dtype)
        return original(acc, x, n_seen, dtype)

    monkeypatch.setitem(statistics.ACCUMULATORS, statistic, counted)
    return calls


def test_hessian_statistic_is_two_xtx_over_the_rows_seen():
    layer, batches = nn.Linear(4, 3), _inputs()
    stats = LayerStatistics("hessian")
    for x in batches:
        stats.observe("fc", layer, x)
    x = _rows(batches)
    expected = 2 * x.T @ x / x.shape[0]
    h = stats.take(["fc"])["fc"]
    assert h.dtype == torch.float32 and h.shape == (4, 4)
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-6)


def test_act_norm_statistic_is_the_mean_square_per_feature():
    layer, batches = nn.Linear(4, 3), _inputs()
    stats = LayerStatistics("act_norm")
    for x in batches:
        stats.observe("fc", layer, x)
    expected = _rows(batches).pow(2).mean(dim=0)
    norms = stats.take(["fc"])["fc"]
    assert norms.dtype == torch.float32 and norms.shape == (4,)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=1e-6)


def test_linear_layers_fed_the_same_tensor_share_one_statistic(monkeypatch):
    calls = _counting(monkeypatch)
    stats = LayerStatistics("hessian")
    q, k, v = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 2)
    batches = _inputs()
    for x in batches:
        for name, layer in (("q", q), ("k", k), ("v", v)):
            stats.observe(name, layer, x)
    assert len(calls) == len(batches)  # once per batch, for the first of them
    assert all(stats.has(name) for name in ("q", "k", "v"))
    taken = stats.take(["q", "k", "v"])
    assert torch.equal(taken["q"], taken["k"]) and torch.equal(taken["q"], taken["v"])
    x = _rows(batches)
    torch.testing.assert_close(taken["v"].double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_layers_fed_equal_but_distinct_tensors_accumulate_separately(monkeypatch):
    calls = _counting(monkeypatch)
    stats = LayerStatistics("hessian")
    x = _inputs(1)[0]
    stats.observe("q", nn.Linear(4, 3), x)
    stats.observe("k", nn.Linear(4, 3), x.clone())
    assert len(calls) == 2
    taken = stats.take(["q", "k"])
    assert torch.equal(taken["q"], taken["k"])


def test_layers_of_another_class_fed_the_same_tensor_do_not_share(monkeypatch):
    class OtherLinear(nn.Linear):
        pass

    calls = _counting(monkeypatch, "act_norm")
    stats = LayerStatistics("act_norm")
    x = _inputs(1)[0]
    stats.observe("q", nn.Linear(4, 3), x)
    stats.observe("k", OtherLinear(4, 3), x)
    assert len(calls) == 2


def test_take_forgets_the_statistics_it_returns():
    stats = LayerStatistics("hessian")
    first, second = _inputs(2)
    layer = nn.Linear(4, 3)
    stats.observe("fc", layer, first)
    stats.take(["fc"])
    assert not stats.has("fc")
    with pytest.raises(PPQConfigError, match="fc never ran during calibration"):
        stats.take(["fc"])
    stats.observe("fc", layer, second)  # starts afresh
    x = _rows([second])
    torch.testing.assert_close(
        stats.take(["fc"])["fc"].double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6
    )


def test_take_of_shared_statistics_forgets_them_all():
    stats = LayerStatistics("act_norm")
    x = _inputs(1)[0]
    stats.observe("gate", nn.Linear(4, 3), x)
    stats.observe("up", nn.Linear(4, 3), x)
    stats.take(["gate", "up"])
    assert not stats.has("gate") and not stats.has("up")


def test_end_block_stops_sharing_across_blocks(monkeypatch):
    calls = _counting(monkeypatch)
    stats = LayerStatistics("hessian")
    x = _inputs(1)[0]
    stats.observe("block0.down", nn.Linear(4, 4), x)
    stats.end_block()
    stats.observe("block1.q", nn.Linear(4, 3), x)  # the very same tensor, in the next block
    assert len(calls) == 2
    assert stats.has("block0.down") and stats.has("block1.q")


def test_sharing_in_some_batches_only_raises():
    stats = LayerStatistics("hessian")
    q, k = nn.Linear(4, 3), nn.Linear(4, 3)
    first, second = _inputs(2)
    stats.observe("q", q, first)
    stats.observe("k", k, first)  # shares q's input
    stats.observe("q", q, second)
    with pytest.raises(RuntimeError, match="k: its input was the input of q"):
        stats.observe("k", k, second.clone())  # not q's input any more


@pytest.mark.parametrize(
    ("dtype", "expected"), [("float32", torch.float32), ("float64", torch.float64)]
)
def test_statistics_are_summed_in_the_requested_dtype_and_taken_as_float32(
    monkeypatch, dtype, expected
):
    calls = _counting(monkeypatch)
    stats = LayerStatistics("hessian", dtype)
    assert stats.dtype == expected
    for x in _inputs():
        stats.observe("fc", nn.Linear(4, 3), x)
    assert calls == [expected] * 3
    assert stats.take(["fc"])["fc"].dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "fp64", torch.float64])
def test_bad_statistics_dtype_raises(dtype):
    message = f"statistics_dtype={dtype!r} is not allowed: expected one of float32, float64."
    with pytest.raises(PPQConfigError, match=re.escape(message)):
        LayerStatistics("hessian", dtype)


def test_check_statistics_dtype_returns_accepted_values():
    assert check_statistics_dtype("float32") == "float32"
    assert check_statistics_dtype("float64") == "float64"


def test_conv_input_statistic_is_over_the_unfolded_patches():
    conv = nn.Conv2d(2, 3, kernel_size=2)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    stats = LayerStatistics("act_norm")
    stats.observe("conv", conv, x)
    patches = torch.stack(
        [x[0, :, i : i + 2, j : j + 2].reshape(-1) for i in range(2) for j in range(2)]
    )  # (4 positions, 2 * 2 * 2)
    torch.testing.assert_close(stats.take(["conv"])["conv"], patches.pow(2).mean(dim=0))


def test_an_unknown_statistic_is_a_config_error():
    with pytest.raises(PPQConfigError, match=r"statistic='bogus'.*hessian, act_norm"):
        LayerStatistics("bogus")


def test_uninformative_statistics_are_zero_or_rank_one_hessians_only():
    from ppq_lightning.calibration.statistics import CONSTANT, ZERO, neutral_statistic
    from ppq_lightning.calibration.statistics import uninformative as find
    from ppq_lightning.ops.hessian import accumulate_hessian

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 24, generator=generator)
    h, _ = accumulate_hessian(None, x, 0)
    assert find(h) is None and find(torch.stack([h, h])) is None
    assert find(torch.zeros(24, 24)) == ZERO and find(torch.zeros(24), "act_norm") == ZERO
    assert find(x.pow(2).mean(0), "act_norm") is None
    scaled = torch.randn(64, 1, generator=generator) * torch.randn(1, 24, generator=generator)
    assert find(accumulate_hessian(None, scaled, 0)[0]) == CONSTANT  # multiples of one row
    assert find(accumulate_hessian(None, x[:2], 0)[0]) is None  # two rows: rank two
    assert find(torch.full((4, 4), float("inf"))) is None  # the solver's to refuse
    assert torch.equal(neutral_statistic(torch.zeros(2, 3, 3)), torch.eye(3).expand(2, 3, 3))
    assert torch.equal(neutral_statistic(torch.zeros(5), "act_norm"), torch.ones(5))


def test_a_hessian_dominated_by_one_large_input_is_not_constant():
    # every input of x varies on its own; one is 1000x larger (an LLM's massive activation):
    # its pairs' gap H_ii H_jj - H_ij^2 is small next to max(diag)^2, not next to H_ii H_jj
    from ppq_lightning.calibration.statistics import uninformative
    from ppq_lightning.ops.hessian import accumulate_hessian

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 1000
    assert uninformative(accumulate_hessian(None, x, 0)[0]) is None
