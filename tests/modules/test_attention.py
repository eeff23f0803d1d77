"""nn.MultiheadAttention's projections as linear layers (modules.attention)."""

from __future__ import annotations

import copy
import itertools
from functools import partial

import pytest
import torch
from torch import nn

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.attention import (
    AttentionProjection,
    check_runs_modules,
    fastpath_disabled,
    forward_through_projections,
    install_projection_views,
)
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.modules.transforms import attach_weight_transform, detach_weight_transform
from ppq_lightning.modules.views import set_weight_matrix, weight_grad, weight_matrix

E = 8


def _attention(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, 2, **kwargs)


def _zeroed(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(weight)


def test_views_are_rows_of_in_proj_weight_and_write_into_it():
    attention = _attention()
    added = install_projection_views(attention)
    assert added == ["q_proj", "k_proj", "v_proj"]
    packed = attention.in_proj_weight
    for index, name in enumerate(added):
        view = attention.get_submodule(name)
        assert isinstance(view, AttentionProjection) and isinstance(view, nn.Linear)
        rows = slice(index * E, (index + 1) * E)
        assert torch.equal(view.weight, packed[rows])
        assert torch.equal(view.bias, attention.in_proj_bias[rows])
        assert (view.out_features, view.in_features) == (E, E)
    with torch.no_grad():
        set_weight_matrix(attention.k_proj, torch.full((E, E), 7.0))
    assert (packed[E : 2 * E] == 7).all() and not (packed[:E] == 7).any()
    assert install_projection_views(attention) == []  # idempotent


def test_views_of_separate_projection_weights_and_their_gradient():
    attention = _attention(kdim=5, vdim=3)
    install_projection_views(attention)
    assert attention.k_proj.weight is attention.k_proj_weight
    assert weight_matrix(attention.v_proj).shape == (E, 3)
    query, key, value = torch.randn(4, 2, E), torch.randn(6, 2, 5), torch.randn(6, 2, 3)
    attention(query, key, value)[0].sum().backward()
    assert weight_grad(attention.v_proj) is attention.v_proj_weight.grad
    packed = _attention()
    install_projection_views(packed)
    x = torch.randn(4, 2, E)
    packed(x, x, x)[0].sum().backward()
    torch.testing.assert_close(weight_grad(packed.v_proj), packed.in_proj_weight.grad[2 * E :])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_installing_changes_neither_outputs_nor_state_dict_keys(batch_first, training):
    attention = _attention(batch_first=batch_first, dropout=0.0).train(training)
    x = torch.randn(2, 5, E)
    before = attention.state_dict()
    with torch.no_grad():  # eval + no_grad + batch_first: torch's fused fast path
        expected = attention(x, x, x)
    install_projection_views(attention)
    with torch.no_grad():
        got = attention(x, x, x)
    assert list(attention.state_dict()) == list(before)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    fresh = _attention(batch_first=batch_first)
    fresh.load_state_dict(attention.state_dict())  # a checkpoint loads either way


BOOL = (False, True)
CASES = list(itertools.product(BOOL, BOOL, BOOL, [None, 6], BOOL))


@pytest.mark.parametrize(("batch_first", "bias", "bias_kv", "kdim", "need_weights"), CASES)
def test_forward_through_projections_computes_what_torch_computes(
    batch_first, bias, bias_kv, kdim, need_weights
):
    attention = _attention(
        bias=bias, add_bias_kv=bias_kv, add_zero_attn=bias_kv, kdim=kdim, vdim=kdim,
        batch_first=batch_first,
    )  # fmt: skip
    install_projection_views(attention)
    query = torch.randn(3, 5, E) if batch_first else torch.randn(5, 3, E)
    key = torch.randn(3, 7, kdim or E) if batch_first else torch.randn(7, 3, kdim or E)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -1] = True
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[0, 1] = True
    for kwargs in ({}, {"key_padding_mask": padding, "attn_mask": mask}):
        expected = nn.MultiheadAttention.forward(
            attention, query, key, key, need_weights=need_weights, **kwargs
        )
        got = forward_through_projections(
            attention, query, key, key, need_weights=need_weights, **kwargs
        )
        torch.testing.assert_close(got[0], expected[0])
        assert (got[1] is None) == (expected[1] is None)
        if need_weights:
            torch.testing.assert_close(got[1], expected[1])


def test_hooks_on_the_projections_see_query_key_value_and_the_attention_output():
    attention = _attention(batch_first=True).eval()
    install_projection_views(attention)
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        module = attention.get_submodule(name)
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: args[0]}))
    query, memory = torch.randn(2, 5, E), torch.randn(2, 7, E)
    with torch.no_grad():
        output = attention(query, memory, memory, need_weights=False)[0]
    torch.testing.assert_close(seen["q_proj"], query.transpose(0, 1))
    assert seen["k_proj"] is seen["v_proj"]  # one tensor: layers fed it share statistics
    torch.testing.assert_close(seen["k_proj"], memory.transpose(0, 1))
    # out_proj reads the attention output: torch's attention with an identity out_proj
    identity = copy.deepcopy(attention)
    with torch.no_grad():
        identity.out_proj.weight.copy_(torch.eye(E))
        identity.out_proj.bias.zero_()
        heads = nn.MultiheadAttention.forward(identity, query, memory, memory, need_weights=False)
    torch.testing.assert_close(seen["out_proj"], heads[0].transpose(0, 1).reshape(-1, E))
    torch.testing.assert_close(output, attention.out_proj(heads[0]))


@pytest.mark.parametrize("layer", ["q_proj", "out_proj"])
def test_a_weight_transform_on_a_projection_changes_what_the_attention_computes(layer):
    attention = _attention(batch_first=True).eval()
    install_projection_views(attention)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        dense = attention(x, x, x)[0]
        module = attention.get_submodule(layer)
        attach_weight_transform(module, partial(_zeroed, module))
        transformed = attention(x, x, x)[0]
        detach_weight_transform(module)
        restored = attention(x, x, x)[0]
        with torch.no_grad():
            module.weight.data.zero_()  # what the transform computes with
            expected = forward_through_projections(attention, x, x, x)[0]
    assert not torch.allclose(transformed, dense)
    torch.testing.assert_close(transformed, expected)
    assert torch.equal(restored, dense)


def test_installing_keeps_the_fused_encoder_layers_fast_path_and_its_outputs(monkeypatch):
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True), 2,
        enable_nested_tensor=False,
    ).eval()  # fmt: skip
    fused, calls = torch._transformer_encoder_layer_fwd, []
    monkeypatch.setattr(
        torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or fused(*a)
    )
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = encoder(x)  # eval + no_grad + batch_first: torch's fused kernel
        install_projection_views(encoder)
        assert torch.equal(encoder(x), expected)
        assert len(calls) == 4  # two layers, twice: the fast path stayed
        with fastpath_disabled():
            torch.testing.assert_close(encoder(x), expected)
    assert len(calls) == 4


def test_the_fused_encoder_layer_leaves_its_fast_path_while_a_layer_is_transformed():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True).eval()
    install_projection_views(encoder)
    x = torch.randn(2, 5, E)
    for name in ("self_attn.q_proj", "linear1"):
        module = encoder.get_submodule(name)
        with torch.no_grad():
            dense = encoder(x)
            attach_weight_transform(module, partial(_zeroed, module))
            transformed = encoder(x)  # eval + no_grad + batch_first: torch's fused kernel
            detach_weight_transform(module)
            saved = module.weight.detach().clone()
            module.weight.data.zero_()
            expected = encoder(x)
            module.weight.data.copy_(saved)
        assert not torch.allclose(transformed, dense)
        torch.testing.assert_close(transformed, expected)


def test_targets_see_every_projection_in_order_and_the_state_dict_keys_stay():
    model = nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, 2, 16), nn.Linear(E, 3))
    keys = list(model.state_dict())
    chosen = resolve_targets(model, targets=r"self_attn")
    assert list(chosen) == [f"1.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert list(model.state_dict()) == keys


class _OwnForward(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):
        return super().forward(query, key, value, need_weights=False, **kwargs)


def test_an_attention_subclass_with_its_own_forward_is_refused_where_modules_must_run():
    attention = _OwnForward(E, 2)
    install_projection_views(attention)
    x = torch.randn(5, 2, E)
    with torch.no_grad():
        before = attention(x, x, x)[0]
    assert "forward" not in attention.__dict__  # its own forward stays in charge
    layers = {"attn.q_proj": attention.q_proj, "attn.out_proj": attention.out_proj}
    with pytest.raises(PPQConfigError, match=r"attn.q_proj is a projection of _OwnForward"):
        check_runs_modules(layers, "calibration statistics")
    with pytest.raises(PPQConfigError, match="own forward"):
        attach_weight_transform(attention.out_proj, partial(_zeroed, attention.out_proj))
    with torch.no_grad():
        assert torch.equal(attention(x, x, x)[0], before)


def test_an_attribute_named_like_a_projection_is_refused():
    attention = _attention()
    attention.q_proj = nn.Identity()
    with pytest.raises(PPQConfigError, match="already has an attribute 'q_proj'"):
        install_projection_views(attention)


def test_a_view_cannot_be_given_another_weight():
    attention = _attention()
    install_projection_views(attention)
    with pytest.raises(PPQConfigError, match="view of its in_proj_weight"):
        attention.q_proj.weight = nn.Parameter(torch.zeros(E, E))


def test_separate_projection_weights_are_targets_not_ties():
    """With ``kdim``/``vdim`` other than ``embed_dim`` the attention owns ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight``, each read whole by its view: the views are targets,
    not layers tied to the attention (every target on such an attention was refused)."""
    attention = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
    model = nn.ModuleDict({"attention": attention})
    chosen = resolve_targets(model, targets="attention")
    assert {"attention.q_proj", "attention.k_proj", "attention.v_proj"} <= set(chosen)
    assert chosen["attention.k_proj"].weight is attention.k_proj_weight
