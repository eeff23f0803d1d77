import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import BlockRemoval, MagnitudePruning, RTNQuantization
from ppq_lightning.callbacks.basis_sharing import BasisSharing
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.sharing import SharedBasisLinear
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from tests.helpers import TINY_LLAMA, make_trainer

# (out, in) of each projection of a TINY_LLAMA block
SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}
SQUARE_INPUTS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # in = 64


def _tokens() -> torch.Tensor:
    return torch.randint(
        0, TINY_LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0)
    )


def _logits(module: CausalLMModule) -> torch.Tensor:
    with torch.no_grad():
        return module.model(_tokens()).logits


def _hand_rate(rank: int, g: int = 2) -> float:
    """Nominal C of S alone on TINY_LLAMA (all seven projections, one group each)."""
    original = sum(g * out * inp for out, inp in SHAPES.values())
    factors = sum(rank * (inp + g * out) for out, inp in SHAPES.values())
    return original / factors


def test_full_rank_sharing_replaces_layers_and_keeps_outputs(tmp_path, tiny_lm, tiny_data):
    dense = _logits(tiny_lm)
    stage = BasisSharing(group_size=2, rank=64, projections=SQUARE_INPUTS)
    make_trainer(tmp_path, [stage]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    layers = tiny_lm.model.model.layers
    for name in [n for n in SHAPES if not n.endswith("down_proj")]:
        first, second = layers[0].get_submodule(name), layers[1].get_submodule(name)
        assert isinstance(first, SharedBasisLinear) and isinstance(second, SharedBasisLinear)
        assert first.basis is second.basis and first.coefficients is not second.coefficients
    assert isinstance(layers[0].mlp.down_proj, nn.Linear)  # not in `projections`
    assert torch.allclose(_logits(tiny_lm), dense, atol=1e-4)
    names = [n for n, _ in tiny_lm.named_modules()]
    assert sum(n.endswith("q_proj.basis") for n in names) == 1  # named_modules: once
    metrics = stage.result.layers["model.model.layers.1.self_attn.k_proj"]
    assert metrics["rank"] == 64 and metrics["relative_error"] < 1e-10
    assert check_invariants(tiny_lm) == 6 * 3  # per projection: a basis and two coefficients


def test_compression_rate_counts_the_shared_basis_once(tmp_path, tiny_lm, tiny_data):
    stage = BasisSharing(group_size=2, rank=16)
    make_trainer(tmp_path, [stage]).validate(tiny_lm, datamodule=tiny_data, verbose=False)
    summary = stage.result.summary
    assert _hand_rate(16) == pytest.approx(3.0)  # 73728 original weights / 24576 factors
    assert summary.n_weights == sum(2 * out * inp for out, inp in SHAPES.values())
    assert summary.nominal_C == pytest.approx(_hand_rate(16))
    assert summary.measured_C == pytest.approx(_hand_rate(16))
    assert summary.avg_bits == 16 and summary.sparsity == 0
    for name, (out, inp) in SHAPES.items():
        metrics = stage.result.layers[f"model.model.layers.0.{name}"]
        assert metrics["params"] == 16 * out and metrics["basis_params"] == 16 * inp
        assert 0 < metrics["relative_error"] < 1


def test_ratio_sets_the_rank_of_each_group(tiny_lm):
    result = BasisSharing(group_size=2, ratio=0.5).apply(tiny_lm)
    for name, (out, inp) in SHAPES.items():
        metrics = result.layers[f"model.model.layers.0.{name}"]
        assert metrics["rank"] == (0.5 * 2 * out * inp) // (inp + 2 * out)
        assert metrics["group_params"] <= 0.5 * 2 * out * inp
    assert 2.0 <= result.summary.measured_C < 2.1  # the rank is rounded down


def test_trailing_group_shares_among_its_own_blocks():
    module = CausalLMModule(model_config={**TINY_LLAMA, "num_hidden_layers": 3}, seed=0)
    result = BasisSharing(group_size=2, ratio=0.5, projections="q_proj").apply(module)
    q = [block.self_attn.q_proj for block in module.model.model.layers]
    assert q[0].basis is q[1].basis and q[2].basis is not q[0].basis
    assert q[0].rank == (0.5 * 2 * 64 * 64) // (64 + 128) and q[2].rank == 0.5 * 64 * 64 // 128
    assert result.layers["model.model.layers.2.self_attn.q_proj"]["group_size"] == 1


def test_composes_with_pruning_and_quantization(tmp_path, tiny_lm, tiny_data):
    sharing = BasisSharing(group_size=2, rank=16)
    pruning = MagnitudePruning(sparsity=0.5)
    quantization = RTNQuantization(bits=4)
    trainer = make_trainer(tmp_path, [sharing, pruning, quantization])
    trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False)
    assert check_invariants(tiny_lm) == 7 * 3
    basis = tiny_lm.model.model.layers[0].self_attn.q_proj.basis
    assert basis is tiny_lm.model.model.layers[1].self_attn.q_proj.basis
    assert (basis.weight == 0).float().mean() == pytest.approx(0.5)
    s, p, q = (stage.result.summary for stage in (sharing, pruning, quantization))
    assert p.nominal_C == pytest.approx(2 * _hand_rate(16))
    assert q.nominal_C == pytest.approx(8 * _hand_rate(16))
    assert q.n_weights == s.n_weights and q.avg_bits == 4 and q.sparsity == pytest.approx(0.5)
    # values at 4 bits + a 1-bit mask + per-channel scales and zeros
    assert 2 * s.measured_C < q.measured_C < (16 / 3) * s.measured_C


def test_quantizing_the_factors_multiplies_the_rate_by_about_four(tiny_lm):
    shared = BasisSharing(group_size=2, rank=16).apply(tiny_lm).summary
    quantized = RTNQuantization(bits=4).apply(tiny_lm, index=2).summary
    assert quantized.nominal_C == pytest.approx(4 * shared.nominal_C)
    # 4-bit values plus an fp16 scale and a 4-bit zero per row of every factor: a basis has
    # 16 rows, the coefficients of a layer `out` rows (of only 16 weights: a large overhead)
    factors = sum(16 * (inp + 2 * out) for out, inp in SHAPES.values())
    rows = sum(16 + 2 * out for out, _ in SHAPES.values())
    stored = factors * 4 + rows * (16 + 4)
    assert quantized.measured_C == pytest.approx(16 * shared.n_weights / stored)
    assert 3 < quantized.measured_C / shared.measured_C < 4


def test_state_dict_loads_into_a_fresh_model(tiny_lm):
    BasisSharing(group_size=2, rank=16).apply(tiny_lm)
    MagnitudePruning(sparsity=0.5).apply(tiny_lm, index=2)
    RTNQuantization(bits=4).apply(tiny_lm, index=3)
    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=7)
    enable_state_loading(fresh)
    fresh.load_state_dict(tiny_lm.state_dict(), strict=True)
    assert torch.equal(_logits(fresh), _logits(tiny_lm))
    layers = fresh.model.model.layers
    assert layers[0].mlp.up_proj.basis is layers[1].mlp.up_proj.basis
    assert check_invariants(fresh) == 7 * 3
    assert compression_summary(fresh) == compression_summary(tiny_lm)


def test_checkpoint_round_trip_skips_the_stage(tmp_path, tiny_lm, tiny_data):
    stage = BasisSharing(group_size=2, rank=16, projections=["q_proj", "down_proj"])
    trainer = make_trainer(tmp_path, [stage])
    trainer.validate(tiny_lm, datamodule=tiny_data, verbose=False)
    ckpt = tmp_path / "sharing.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=5)
    again = BasisSharing(group_size=2, rank=16, projections=["q_proj", "down_proj"])
    make_trainer(tmp_path, [again]).validate(
        fresh, datamodule=tiny_data, ckpt_path=ckpt, verbose=False
    )
    assert again.result is None
    assert torch.equal(_logits(fresh), _logits(tiny_lm))


def test_block_removal_after_sharing_keeps_the_original_weight_count(tiny_lm, tiny_data):
    stage = BasisSharing(group_size=2, rank=16, projections=["q_proj", "down_proj"])
    shared = stage.apply(tiny_lm).summary
    removal = BlockRemoval(n_blocks=1, num_calibration_batches=2)
    removed = removal.apply(tiny_lm, index=2, dataloader=tiny_data.calibration_dataloader())
    assert removed.summary.n_weights == shared.n_weights
    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=7)
    enable_state_loading(fresh)
    fresh.load_state_dict(tiny_lm.state_dict(), strict=True)
    assert torch.equal(_logits(fresh), _logits(tiny_lm))


def test_fit_trains_the_factors(tmp_path, tiny_lm, tiny_data):
    stage = BasisSharing(group_size=2, rank=16, projections="q_proj")
    trainer = make_trainer(tmp_path, [stage], max_steps=1, limit_val_batches=0)
    trainer.fit(tiny_lm, datamodule=tiny_data)
    basis = tiny_lm.model.model.layers[0].self_attn.q_proj.basis
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(basis.weight) in optimized


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 1, "rank": 4}, "group_size=1 is not allowed"),
        ({"group_size": 2.0, "rank": 4}, "group_size=2.0 is not allowed"),
        ({"group_size": 2}, "give exactly one"),
        ({"group_size": 2, "rank": 4, "ratio": 0.5}, "give exactly one"),
        ({"group_size": 2, "rank": 0}, "rank=0 is not allowed"),
        (
            {"group_size": 2, "ratio": 1.0},
            r"ratio=1.0 is not allowed: expected a number in \(0, 1\)",
        ),
        ({"group_size": 2, "rank": 4, "projections": []}, "projections=\\[\\] is not allowed"),
        ({"group_size": 2, "rank": 4, "projections": ["("]}, "projections='\\(' is not allowed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        BasisSharing(**kwargs)


def _no_sharing(module: CausalLMModule) -> bool:
    return not any(isinstance(m, SharedBasisLinear) for m in module.modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 3, "rank": 4}, r"group_size=3 .*from 2 to 2 \(the model has 2 blocks"),
        ({"group_size": 2, "rank": 65}, r"rank=65 .*from 1 to 64 = min\(in, g\*out\)"),
        ({"group_size": 2, "ratio": 0.001}, "ratio=0.001 .*it gives rank 0"),
        ({"group_size": 2, "rank": 4, "projections": ["q_proj", "nope"]}, r"\['nope'\] matched no"),
    ],
)
def test_run_time_errors_change_nothing(tiny_lm, kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        BasisSharing(**kwargs).apply(tiny_lm)
    assert _no_sharing(tiny_lm)


def test_sharing_a_projection_twice_is_an_error(tiny_lm):
    BasisSharing(group_size=2, rank=8, projections=["q_proj"]).apply(tiny_lm)
    with pytest.raises(PPQConfigError, match="q_proj, which is already factorised"):
        BasisSharing(group_size=2, rank=4).apply(tiny_lm)
    assert isinstance(tiny_lm.model.model.layers[0].self_attn.k_proj, nn.Linear)


def test_already_compressed_layers_are_an_error(tiny_lm):
    RTNQuantization(bits=4).apply(tiny_lm)
    with pytest.raises(PPQConfigError, match=r"already compressed by stages .*\(S>P>Q\)"):
        BasisSharing(group_size=2, rank=4).apply(tiny_lm)
    assert _no_sharing(tiny_lm)


def test_layers_of_a_group_must_agree_in_shape(tiny_lm):
    tiny_lm.model.model.layers[1].mlp.down_proj = nn.Linear(128, 48, bias=False)
    with pytest.raises(PPQConfigError, match=r"down_proj'\] share a basis but differ"):
        BasisSharing(group_size=2, rank=4).apply(tiny_lm)
    assert _no_sharing(tiny_lm)  # the earlier projections' groups were not replaced either


def test_gpt2_conv1d_projections_are_shared():
    from tests.helpers import tiny_family as _model

    model = _model("gpt2", layers=2).eval()
    tokens = _tokens()
    with torch.no_grad():
        dense = model(tokens).logits
    BasisSharing(group_size=2, rank=32, projections=["c_attn", "mlp.c_fc"]).apply(model)
    blocks = model.transformer.h
    assert blocks[0].attn.c_attn.basis is blocks[1].attn.c_attn.basis
    assert blocks[0].mlp.c_fc.out_features == 128  # Conv1D(128, 32) read as (out, in)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, dense, atol=1e-4)  # full rank: min(32, 2*out)


def _calibration() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, TINY_LLAMA["vocab_size"], (1, 24), generator=gen)}]


def test_whitened_sharing_factorises_with_the_dense_inputs_of_the_group(tiny_lm):
    """The basis equals the op's on the Hessian of the group's inputs, captured on the dense
    model (both blocks' q_proj inputs), and the output error beats the plain SVD's."""
    from ppq_lightning.ops.basis_sharing import shared_basis
    from ppq_lightning.ops.hessian import accumulate_hessian, whitening_factor

    data = _calibration() * 3
    layers = [tiny_lm.model.model.layers[i].self_attn.q_proj for i in range(2)]
    captured: list[list[torch.Tensor]] = [[], []]
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: captured[i].append(a[0].flatten(0, 1)))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in data:
            tiny_lm.model(batch["input_ids"])
    for handle in handles:
        handle.remove()
    hessian = sum(accumulate_hessian(None, torch.cat(xs), 0)[0] for xs in captured)
    weights = [layer.weight.detach().clone() for layer in layers]
    expected = shared_basis(weights, 8, whitening_factor(hessian, damp=0.01))

    stage = BasisSharing(group_size=2, rank=8, projections=["q_proj"], whiten=True)
    stage.apply(tiny_lm, dataloader=data)
    shared = [tiny_lm.model.model.layers[i].self_attn.q_proj for i in range(2)]
    assert all(isinstance(m, SharedBasisLinear) for m in shared)
    assert shared[0].basis is shared[1].basis
    torch.testing.assert_close(shared[0].basis.weight, expected.basis, rtol=1e-4, atol=1e-5)
    for layer, c in zip(shared, expected.coefficients, strict=True):
        torch.testing.assert_close(layer.coefficients.weight, c, rtol=1e-4, atol=1e-5)
    assert stage.calibration_report.n_batches == 3

    def output_error(ws, xs, factors_of):
        return sum(
            float(((w - f) @ torch.cat(x).T).pow(2).sum())
            for w, f, x in zip(ws, factors_of, xs, strict=True)
        )

    plain = shared_basis(weights, 8)
    approx = [m.coefficients.weight @ m.basis.weight for m in shared]
    plain_approx = [c @ plain.basis for c in plain.coefficients]
    assert output_error(weights, captured, approx) < output_error(weights, captured, plain_approx)


def test_whitened_sharing_needs_calibration_data(tiny_lm):
    with pytest.raises(PPQConfigError, match="needs calibration data"):
        BasisSharing(group_size=2, rank=8, whiten=True).apply(tiny_lm)
    assert _no_sharing(tiny_lm)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"whiten": "yes"}, "whiten='yes' is not allowed: expected true or false"),
        ({"split": "even"}, "split='even' is not allowed: expected one of balanced, coefficients"),
        ({"whiten": True, "damp": 0}, "damp=0 is not allowed"),
        ({"whiten": True, "num_calibration_batches": 0}, "num_calibration_batches=0"),
    ],
)
def test_bad_whitening_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        BasisSharing(group_size=2, rank=4, **kwargs)


def test_whitened_sharing_of_every_projection_accumulates_shared_inputs_once(tiny_lm, monkeypatch):
    from ppq_lightning.calibration.statistics import ACCUMULATORS

    calls = []
    real = ACCUMULATORS["hessian"]
    monkeypatch.setitem(ACCUMULATORS, "hessian", lambda *a: calls.append(1) or real(*a))
    data = _calibration() * 2
    dense = _logits(tiny_lm)
    BasisSharing(group_size=2, ratio=0.9, whiten=True).apply(tiny_lm, dataloader=data)
    assert len(calls) == 4 * 2 * 2  # q (k, v), o, gate (up), down; 2 blocks, 2 batches
    shared = [m for m in tiny_lm.modules() if isinstance(m, SharedBasisLinear)]
    assert len(shared) == 14
    assert torch.isfinite(_logits(tiny_lm)).all() and not torch.equal(_logits(tiny_lm), dense)


@pytest.mark.parametrize("whiten", [False, True])
def test_sharing_the_mlps_of_a_torchvision_vit_with_named_blocks(tmp_path, whiten):
    """torchvision's ViT holds its blocks in an ``nn.Sequential(OrderedDict(...))``:
    ``encoder.layers.encoder_layer_0``, not ``encoder.layers.0`` (the names BasisSharing used
    to build, which it then failed to find)."""
    from tests.user_modules.modules import UserClassifier, images

    model = UserClassifier("torchvision_vit")
    layers = model.net.encoder.layers
    assert [n for n, _ in layers.named_children()] == ["encoder_layer_0", "encoder_layer_1"]
    stage = BasisSharing(group_size=2, rank=8, projections=[r"mlp\.0", r"mlp\.3"], whiten=whiten)
    trainer = make_trainer(tmp_path, [stage])
    dense = trainer.validate(model, dataloaders=images(), verbose=False)[0]["val_acc"]
    assert 0.0 <= dense <= 1.0
    first, second = layers.encoder_layer_0.mlp, layers.encoder_layer_1.mlp
    for index in (0, 3):
        assert isinstance(first[index], SharedBasisLinear)
        assert first[index].basis is second[index].basis and first[index].rank == 8
    assert check_invariants(model) == 4 + 2  # coefficients per layer, a basis per group
    fresh = UserClassifier("torchvision_vit")
    enable_state_loading(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = next(iter(images()))[0]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
