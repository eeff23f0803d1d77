import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppq_lightning.compressed.state import (
    current_mask,
    get_state,
    record_grid,
    record_mask,
    record_stage,
)
from ppq_lightning.edits.channels import (
    KEPT_COLUMNS,
    KEPT_ROWS,
    ChannelEdit,
    apply_channel_edits,
    output_projections,
    plan_channel_edits,
    replay_kept_columns,
    replay_kept_rows,
    select_columns,
    select_rows,
)
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.edits.sharing import SharedBasisLinear
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.views import weight_matrix
from ppq_lightning.ops.quant_grid import compute_grid
from tests.helpers import TINY_LLAMA, tiny_causal_lm, token_batches

ENTRY = {"stage": "ChannelPruning", "method": "ChannelPruning", "kind": "P", "ratio": 0.25}
ROWS = torch.tensor([0, 3, 4])
COLS = torch.tensor([1, 2])


def _linear(in_features: int = 5, out_features: int = 6) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features)


def _conv1d(nf: int = 6, nx: int = 5) -> Conv1D:
    torch.manual_seed(0)
    layer = Conv1D(nf, nx)  # weight (in, out) = (nx, nf)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def _mask(shape: tuple[int, int]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5


# -- select_rows / select_columns on nn.Linear ----------------------------------------------------
def test_select_rows_of_a_linear_keeps_those_rows_of_weight_and_bias():
    layer = _linear()
    weight, bias = layer.weight.data.clone(), layer.bias.data.clone()
    x = torch.randn(4, 5)
    full = layer(x)
    select_rows(layer, ROWS)
    assert torch.equal(layer.weight.data, weight[ROWS])
    assert torch.equal(layer.bias.data, bias[ROWS])
    assert (layer.out_features, layer.in_features) == (3, 5)
    assert torch.allclose(layer(x), full[:, ROWS])


def test_select_columns_of_a_linear_keeps_those_columns_and_the_whole_bias():
    layer = _linear()
    weight, bias = layer.weight.data.clone(), layer.bias.data.clone()
    select_columns(layer, COLS)
    assert torch.equal(layer.weight.data, weight[:, COLS])
    assert torch.equal(layer.bias.data, bias)
    assert (layer.out_features, layer.in_features) == (6, 2)


def test_select_rows_and_columns_keep_requires_grad():
    layer = _linear()
    layer.weight.requires_grad_(False)
    select_rows(layer, ROWS)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    select_columns(layer, COLS)
    assert not layer.weight.requires_grad and isinstance(layer.weight, nn.Parameter)


def test_select_rows_of_a_linear_without_bias():
    layer = nn.Linear(5, 6, bias=False)
    select_rows(layer, ROWS)
    assert layer.bias is None and layer.weight.shape == (3, 5)


# -- select_rows / select_columns on GPT-2 Conv1D -------------------------------------------------
def test_select_rows_of_a_conv1d_keeps_those_output_columns_of_its_weight():
    layer = _conv1d()
    weight, bias = layer.weight.data.clone(), layer.bias.data.clone()  # (in, out)
    x = torch.randn(4, 5)
    full = layer(x)
    select_rows(layer, ROWS)
    assert torch.equal(layer.weight.data, weight[:, ROWS])
    assert torch.equal(layer.bias.data, bias[ROWS])
    assert (layer.nf, layer.nx) == (3, 5)
    assert torch.allclose(layer(x), full[:, ROWS])


def test_select_columns_of_a_conv1d_keeps_those_input_rows_of_its_weight():
    layer = _conv1d()
    weight, bias = layer.weight.data.clone(), layer.bias.data.clone()
    select_columns(layer, COLS)
    assert torch.equal(layer.weight.data, weight[COLS])
    assert torch.equal(layer.bias.data, bias)
    assert (layer.nf, layer.nx) == (6, 2)
    x = torch.randn(4, 5)
    assert torch.allclose(layer(x[:, COLS]), x[:, COLS] @ weight[COLS] + bias)


# -- the recorded state is sliced too -------------------------------------------------------------
def test_select_rows_slices_the_recorded_mask_of_a_linear():
    layer = _linear()
    mask = _mask((6, 5))
    record_mask(layer, mask)
    select_rows(layer, ROWS)
    assert torch.equal(get_state(layer).mask, mask[ROWS])
    assert (layer.weight.data[~mask[ROWS]] == 0).all()


def test_select_columns_slices_the_recorded_mask_of_a_linear():
    layer = _linear()
    mask = _mask((6, 5))
    record_mask(layer, mask)
    select_columns(layer, COLS)
    assert torch.equal(get_state(layer).mask, mask[:, COLS])


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_select_on_a_conv1d_keeps_the_recorded_mask_in_the_weight_layout(axis):
    layer = _conv1d()
    mask = _mask((6, 5))  # (out, in)
    record_mask(layer, mask)
    if axis == "rows":
        select_rows(layer, ROWS)
        expected = mask[ROWS]
    else:
        select_columns(layer, COLS)
        expected = mask[:, COLS]
    assert get_state(layer).mask.shape == layer.weight.shape
    assert torch.equal(current_mask(layer), expected)


def test_select_rows_slices_a_per_channel_grid():
    layer = _linear()
    grid = compute_grid(layer.weight.data, 4)
    record_grid(layer, grid)
    select_rows(layer, ROWS)
    state = get_state(layer)
    assert torch.equal(state.scale, grid.scale[ROWS]) and torch.equal(state.zero, grid.zero[ROWS])
    assert state.scale.shape == (3, 1)


def test_select_columns_keeps_a_per_channel_grid():
    layer = _linear()
    grid = compute_grid(layer.weight.data, 4)
    record_grid(layer, grid)
    select_columns(layer, COLS)
    state = get_state(layer)
    assert torch.equal(state.scale, grid.scale) and torch.equal(state.zero, grid.zero)


def test_select_rows_slices_a_grouped_grid():
    layer = _linear(in_features=4)
    grid = compute_grid(layer.weight.data, 4, group_size=2)
    record_grid(layer, grid)
    select_rows(layer, ROWS)
    state = get_state(layer)
    assert state.scale.shape == (3, 2) and torch.equal(state.scale, grid.scale[ROWS])
    assert torch.equal(state.zero, grid.zero[ROWS]) and state.group_size == 2


def test_select_columns_of_a_layer_quantized_with_a_group_size_raises_and_changes_nothing():
    layer = _linear(in_features=4)
    record_grid(layer, compute_grid(layer.weight.data, 4, group_size=2))
    before = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(PPQConfigError, match=r"group_size=2"):
        select_columns(layer, COLS)
    after = layer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert layer.in_features == 4


def test_select_rows_of_a_conv1d_slices_its_per_channel_grid():
    layer = _conv1d()
    grid = compute_grid(weight_matrix(layer), 4)
    record_grid(layer, grid)
    select_rows(layer, ROWS)
    assert torch.equal(get_state(layer).scale, grid.scale[ROWS])


# -- planning -------------------------------------------------------------------------------------
def _edits_as_tuples(edits: list[ChannelEdit]) -> list[tuple[str, str, list[int]]]:
    return [(e.attribute, e.axis, e.index.tolist()) for e in edits]


def test_plan_channel_edits_of_a_llama_mlp_keeps_the_top_scores():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    mlp = model.model.layers[0].mlp
    scores = torch.randperm(128, generator=torch.Generator().manual_seed(0)).float()
    edits = plan_channel_edits(mlp, "down_proj", scores, 0.25)
    kept = torch.argsort(scores, descending=True)[:96].sort().values
    assert _edits_as_tuples(edits) == [
        ("gate_proj", "rows", kept.tolist()),
        ("up_proj", "rows", kept.tolist()),
        ("down_proj", "cols", kept.tolist()),
    ]
    assert set(kept.tolist()) == {i for i in range(128) if scores[i] >= 32}


class _OptMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)


def test_plan_channel_edits_of_an_fc1_fc2_mlp():
    scores = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 6.0])
    edits = plan_channel_edits(_OptMLP(), "fc2", scores, 0.5)
    assert _edits_as_tuples(edits) == [("fc1", "rows", [0, 4, 5]), ("fc2", "cols", [0, 4, 5])]


def test_plan_channel_edits_of_grouped_query_attention_keeps_whole_kv_groups():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    attn = model.model.layers[0].self_attn  # 4 query heads, 2 KV heads, head_dim 16
    assert (attn.head_dim, attn.num_key_value_groups) == (16, 2)
    scores = torch.ones(64)
    scores[0] = 10.0  # the best single channel is in KV group 0 (sum 41) ...
    scores[32:] = 1.5  # ... but KV group 1 (query rows 32-63) sums to 48
    edits = plan_channel_edits(attn, "o_proj", scores, 0.5)
    q_rows, kv_rows = list(range(32, 64)), list(range(16, 32))
    assert _edits_as_tuples(edits) == [
        ("q_proj", "rows", q_rows),
        ("k_proj", "rows", kv_rows),
        ("v_proj", "rows", kv_rows),
        ("o_proj", "cols", q_rows),
    ]


def test_plan_channel_edits_at_ratio_zero_keeps_everything():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    attn = model.model.layers[0].self_attn
    edits = plan_channel_edits(attn, "o_proj", torch.rand(64), 0.0)
    everything = [list(range(64)), list(range(32)), list(range(32)), list(range(64))]
    assert [e.index.tolist() for e in edits] == everything


# -- applying and recording -----------------------------------------------------------------------
def test_apply_channel_edits_shrinks_the_mlp_and_records_each_edit():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    mlp = model.model.layers[0].mlp
    scores = torch.randperm(128, generator=torch.Generator().manual_seed(0)).float()
    edits = plan_channel_edits(mlp, "down_proj", scores, 0.25)
    kept = edits[0].index.tolist()
    apply_channel_edits(mlp, edits, ENTRY)
    assert mlp.gate_proj.weight.shape == (96, 64) and mlp.up_proj.weight.shape == (96, 64)
    assert mlp.down_proj.weight.shape == (64, 96)
    for name in ("gate_proj", "up_proj"):
        assert get_state(getattr(mlp, name)).history == [
            {**ENTRY, "edit": KEPT_ROWS, "kept_rows": kept, "removed_weights": 32 * 64}
        ]
    assert get_state(mlp.down_proj).history == [
        {**ENTRY, "edit": KEPT_COLUMNS, "kept_cols": kept, "removed_weights": 64 * 32}
    ]
    logits = model(token_batches(1)[0]).logits
    assert logits.shape == (2, 16, 384)


def test_apply_channel_edits_to_attention_keeps_the_model_running():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    attn = model.model.layers[0].self_attn
    scores = torch.ones(64)
    scores[32:] = 2.0
    apply_channel_edits(attn, plan_channel_edits(attn, "o_proj", scores, 0.5), ENTRY)
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.v_proj.weight.shape == (16, 64) and attn.o_proj.weight.shape == (64, 32)
    assert get_state(attn.k_proj).history[-1]["kept_rows"] == list(range(16, 32))
    assert get_state(attn.o_proj).history[-1]["removed_weights"] == 64 * 32
    assert model(token_batches(1)[0]).logits.shape == (2, 16, 384)


def test_replay_kept_rows_and_columns_reproduce_the_shapes_on_a_fresh_layer():
    source = nn.Sequential(_linear(), nn.ReLU(), _linear(in_features=6, out_features=4))
    select_rows(source[0], ROWS)
    select_columns(source[2], ROWS)
    fresh = nn.Sequential(_linear(), nn.ReLU(), _linear(in_features=6, out_features=4))
    replay_kept_rows(fresh, "0", {**ENTRY, "kept_rows": ROWS.tolist()})
    replay_kept_columns(fresh, "2", {**ENTRY, "kept_cols": ROWS.tolist()})
    assert fresh[0].weight.shape == (3, 5) and fresh[0].bias.shape == (3,)
    assert fresh[2].weight.shape == (4, 3) and fresh[2].in_features == 3
    assert torch.equal(fresh[0].weight, source[0].weight)  # same seed: the same rows
    assert torch.equal(fresh[2].weight, source[2].weight)


def test_replay_kept_rows_on_a_conv1d():
    layer = nn.Sequential(_conv1d())
    replay_kept_rows(layer, "0", {**ENTRY, "kept_rows": [1, 5]})
    assert layer[0].weight.shape == (5, 2) and (layer[0].nf, layer[0].nx) == (2, 5)


def test_a_channel_pruned_llama_state_dict_loads_into_a_fresh_model():
    source = tiny_causal_lm(TINY_LLAMA, 2)
    block = source.model.layers[1]
    scores = torch.randperm(128, generator=torch.Generator().manual_seed(0)).float()
    apply_channel_edits(block.mlp, plan_channel_edits(block.mlp, "down_proj", scores, 0.5), ENTRY)
    heads = torch.arange(64.0)
    apply_channel_edits(
        block.self_attn, plan_channel_edits(block.self_attn, "o_proj", heads, 0.5), ENTRY
    )
    fresh = tiny_causal_lm(TINY_LLAMA, 2)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    enable_state_loading(fresh)
    fresh.load_state_dict(source.state_dict())  # strict
    assert fresh.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    assert fresh.model.layers[1].self_attn.k_proj.weight.shape == (16, 64)
    tokens = token_batches(1)[0]
    assert torch.equal(fresh(tokens).logits, source(tokens).logits)


# -- which output projections a structure prunes --------------------------------------------------
def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize(
    ("structure", "expected"),
    [
        ("mlp", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        ("heads", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
        (
            "both",
            [
                "model.layers.0.mlp.down_proj",
                "model.layers.0.self_attn.o_proj",
                "model.layers.1.mlp.down_proj",
                "model.layers.1.self_attn.o_proj",
            ],
        ),
    ],
)
def test_output_projections_of_each_structure(structure, expected):
    model = tiny_causal_lm(TINY_LLAMA, 2)
    chosen = output_projections(model, _linears(model), structure)
    assert sorted(chosen) == expected
    assert all(chosen[n] is model.get_submodule(n) for n in expected)


def test_output_projections_without_a_known_layout_raises():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    modules = {"model.layers.0.self_attn.q_proj": model.model.layers[0].self_attn.q_proj}
    with pytest.raises(PPQConfigError, match=r"structure='mlp'\) found no known MLP"):
        output_projections(model, modules, "mlp")


def test_output_projections_of_heads_among_mlp_layers_only_raises():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    modules = {n: m for n, m in _linears(model).items() if ".mlp." in n}
    with pytest.raises(PPQConfigError, match=r"structure='heads'\) found no known"):
        output_projections(model, modules, "heads")


def test_output_projections_ignores_an_o_proj_without_head_dim():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, name, nn.Linear(4, 4))

    model = nn.Sequential(Attention())
    with pytest.raises(PPQConfigError, match=r"structure='heads'\) found no known"):
        output_projections(model, _linears(model), "heads")
    model[0].head_dim = 2
    assert list(output_projections(model, _linears(model), "heads")) == ["0.o_proj"]


def test_output_projections_refuses_a_shared_basis_layer_of_the_structure():
    model = tiny_causal_lm(TINY_LLAMA, 1)
    attn = model.model.layers[0].self_attn
    attn.q_proj = SharedBasisLinear(nn.Linear(64, 8, bias=False), nn.Linear(8, 64), "g")
    assert list(output_projections(model, _linears(model), "mlp")) == [
        "model.layers.0.mlp.down_proj"
    ]
    with pytest.raises(PPQConfigError, match=r"cannot shrink \['model.layers.0.self_attn.q_proj'"):
        output_projections(model, _linears(model), "heads")


def test_apply_channel_edits_records_on_top_of_an_older_history():
    layer = _linear()
    record_stage(layer, {"stage": "P", "method": "MagnitudePruning", "kind": "P"})
    parent = nn.Module()
    parent.fc = layer
    apply_channel_edits(parent, [ChannelEdit("fc", "rows", ROWS)], ENTRY)
    assert get_state(layer).stages == ["P", "ChannelPruning"]
    assert get_state(layer).history[-1]["removed_weights"] == 3 * 5
