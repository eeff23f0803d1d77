import pytest
import torch

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import RTNQuantization
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import make_trainer


@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (3, 32), (8, 16), (2, None)])
def test_rtn_through_trainer_validate(tmp_path, tiny_lm, tiny_data, bits, group_size):
    callback = RTNQuantization(bits=bits, group_size=group_size)
    make_trainer(tmp_path, [callback]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    for module in resolve_targets(tiny_lm).values():
        w = module.weight.detach()
        gs = group_size or w.shape[1]
        groups = w.reshape(-1, gs)  # one row of one group per line
        assert max(g.unique().numel() for g in groups) <= 2**bits
        assert get_state(module).bits == bits
    assert callback.result.summary.avg_bits == bits
    assert check_invariants(tiny_lm) == 14


def test_requantizing_records_the_new_grid(tiny_lm):
    RTNQuantization(bits=8, name="Q8").apply(tiny_lm)
    RTNQuantization(bits=4, name="Q4").apply(tiny_lm)
    module = tiny_lm.model.model.layers[0].mlp.up_proj
    state = get_state(module)
    assert state.bits == 4 and [h["bits"] for h in state.history] == [8, 4]
    assert check_invariants(tiny_lm) == 14
    assert module.weight.unique().numel() <= 16 * module.weight.shape[0]


def test_group_size_must_divide_every_layer(tiny_lm):
    with pytest.raises(PPQConfigError, match=r"group_size \(model\.model\.layers\.0"):
        RTNQuantization(bits=4, group_size=48).apply(tiny_lm)
    assert all(get_state(m) is None for m in tiny_lm.modules())  # checked before any change


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, r"bits=9 .*or 16 \(off\)"),
        ({"bits": 32}, "bits=32"),
        ({"bits": 4, "group_size": 0}, "group_size=0"),
        ({"bits": 4, "b_orig": 12}, "b_orig=12"),
        ({"bits": 4, "symmetric": "false"}, "symmetric='false' is not allowed: expected true or"),
        ({"bits": 4, "log_layers": 0}, "log_layers=0 is not allowed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        RTNQuantization(**kwargs)


def test_quantized_weights_are_close(tiny_lm):
    before = {n: m.weight.detach().clone() for n, m in resolve_targets(tiny_lm).items()}
    result = RTNQuantization(bits=8).apply(tiny_lm)
    for name, module in resolve_targets(tiny_lm).items():
        assert torch.allclose(module.weight, before[name], atol=before[name].abs().max() / 100)
        assert result.layers[name]["weight_error"] < 1e-3


def test_sixteen_bits_is_off(tiny_lm):
    before = {n: m.weight.detach().clone() for n, m in resolve_targets(tiny_lm).items()}
    result = RTNQuantization(bits=16).apply(tiny_lm)
    assert result.layers == {} and result.summary.n_layers == 0
    for name, module in resolve_targets(tiny_lm).items():
        assert torch.equal(module.weight, before[name]) and get_state(module) is None
