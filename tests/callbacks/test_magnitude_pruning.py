import pytest
import torch

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import MagnitudePruning
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import make_trainer


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        ({"sparsity": 0.5}, lambda w: (w == 0).float().mean().item() == 0.5),
        (
            {"sparsity": 0.3, "scope": "row"},
            lambda w: bool(torch.all((w == 0).sum(1) == round(0.3 * w.shape[1]))),
        ),
        ({"pattern": "2:4"}, lambda w: bool(torch.all((w.reshape(-1, 4) != 0).sum(1) <= 2))),
    ],
)
def test_pruning_through_trainer_validate(tmp_path, tiny_lm, tiny_data, kwargs, check):
    callback = MagnitudePruning(**kwargs)
    make_trainer(tmp_path, [callback]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    layers = resolve_targets(tiny_lm)
    assert len(layers) == 14  # 7 linear layers per block, embeddings and head left alone
    for module in layers.values():
        assert check(module.weight.detach())
        assert get_state(module).stages == [callback.state_key]
    assert get_state(tiny_lm.model.lm_head) is None
    assert callback.result.summary.sparsity == pytest.approx(
        0.5 if "scope" not in kwargs else 0.3, abs=0.01
    )
    check_invariants(tiny_lm)


def test_global_scope_exact_total(tiny_lm):
    MagnitudePruning(sparsity=0.6, scope="global").apply(tiny_lm)
    layers = resolve_targets(tiny_lm)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert zeros == round(0.6 * total)
    per_layer = {(m.weight == 0).float().mean().item() for m in layers.values()}
    assert len(per_layer) > 1  # one threshold, different sparsities


def test_targets_restrict_the_layers(tiny_lm):
    MagnitudePruning(sparsity=0.5, targets=r"mlp\.(up|gate)_proj").apply(tiny_lm)
    touched = [n for n, m in tiny_lm.named_modules() if get_state(m) is not None]
    assert len(touched) == 4 and all("mlp" in n for n in touched)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"sparsity": 0.5, "pattern": "3:2"}, "pattern='3:2'"),
        ({"sparsity": 0.5, "pattern": "a:b"}, "pattern='a:b'"),
        ({"sparsity": 0.3, "pattern": "2:4"}, "sparsity=0.3"),
        ({"pattern": "unstructured"}, "sparsity=None"),
        ({"sparsity": 0.5, "scope": "block"}, "scope='block'"),
        ({"sparsity": 0.5, "targets": "["}, "targets"),
        ({"sparsity": 0.5, "name": ""}, "name=''"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        MagnitudePruning(**kwargs)


def test_targets_matching_nothing(tmp_path, tiny_lm, tiny_data):
    trainer = make_trainer(tmp_path, [MagnitudePruning(sparsity=0.5, targets="no_such_layer")])
    with pytest.raises(PPQConfigError, match="targets='no_such_layer'"):
        trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False)
    assert all(get_state(m) is None for m in tiny_lm.modules())  # nothing half-written


def test_nm_width_not_divisible(tiny_lm):
    with pytest.raises(PPQConfigError, match="pattern"):
        MagnitudePruning(pattern="2:5").apply(tiny_lm)
    assert all(get_state(m) is None for m in tiny_lm.modules())
