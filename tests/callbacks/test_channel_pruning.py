import pytest
import torch

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import ChannelPruning, MagnitudePruning, RTNQuantization
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.ops.channels import channel_importance
from tests.helpers import TINY_LLAMA, make_trainer


def test_mlp_channels_are_removed_by_importance(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    block = module.model.model.layers[0]
    batches = list(tiny_data.calibration_dataloader())
    seen = []
    hook = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        for batch in batches:
            module(batch["input_ids"])
    hook.remove()
    x = torch.cat([s.flatten(0, 1) for s in seen])
    scores = channel_importance(x.pow(2).mean(0), block.mlp.down_proj.weight)
    expected = torch.topk(scores, 64).indices.sort().values
    w_up = block.mlp.up_proj.weight.detach()[expected].clone()

    stage = ChannelPruning(ratio=0.5, num_calibration_batches=len(batches))
    make_trainer(tmp_path, [stage]).validate(module, datamodule=tiny_data, verbose=False)
    assert block.mlp.up_proj.weight.shape == (64, 64) and block.mlp.gate_proj.out_features == 64
    assert block.mlp.down_proj.weight.shape == (64, 64) and block.mlp.down_proj.in_features == 64
    assert torch.equal(block.mlp.up_proj.weight, w_up)
    summary = stage.result.summary
    attention, mlp = 2 * 64 * 64 + 2 * 32 * 64, 3 * 64 * 128  # per block (GQA: k, v are 32x64)
    assert summary.measured_C == pytest.approx((attention + mlp) / (attention + mlp / 2))


def test_heads_by_kv_group_and_the_model_still_runs(tiny_lm, tiny_data):
    before = tiny_lm.evaluate(tiny_data.val_dataloader())["ppl"]
    ChannelPruning(ratio=0.5, structure="heads").apply(
        tiny_lm, dataloader=tiny_data.calibration_dataloader()
    )
    attn = tiny_lm.model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.v_proj.weight.shape == (16, 64) and attn.o_proj.weight.shape == (64, 32)
    after = tiny_lm.evaluate(tiny_data.val_dataloader())["ppl"]
    assert after != before and after < 10 * before


def test_masks_are_sliced_and_checkpoint_replays_shapes(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [
        MagnitudePruning(sparsity=0.5),
        ChannelPruning(ratio=0.25, structure="both"),
        RTNQuantization(bits=4),
    ]
    trainer = make_trainer(tmp_path, stages)
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    assert check_invariants(module) == 14
    ckpt = tmp_path / "channels.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = module.evaluate(tiny_data.val_dataloader())["ppl"]

    fresh = CausalLMModule(model_config=TINY_LLAMA, seed=3)
    again = [
        MagnitudePruning(sparsity=0.5),
        ChannelPruning(ratio=0.25, structure="both"),
        RTNQuantization(bits=4),
    ]
    make_trainer(tmp_path, again).validate(
        fresh, datamodule=tiny_data, ckpt_path=ckpt, verbose=False
    )
    assert all(stage.result is None for stage in again)
    assert fresh.model.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    assert fresh.evaluate(tiny_data.val_dataloader())["ppl"] == pytest.approx(expected)
    assert check_invariants(fresh) == 14


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_other_mlp_layouts(arch, tiny_data):
    from tests.helpers import tiny_family as _model

    model = _model(arch, layers=2)
    mlp_out = (
        model.model.decoder.layers[0].fc2 if arch == "opt" else model.transformer.h[0].mlp.c_proj
    )
    before = mlp_out.weight.numel()
    ChannelPruning(ratio=0.5).apply(
        model, dataloader=[b["input_ids"] for b in tiny_data.calibration_dataloader()]
    )
    assert mlp_out.weight.numel() == before // 2
    model(torch.randint(0, 384, (1, 8)))


def test_grouped_grid_blocks_column_removal(tiny_lm, tiny_data):
    RTNQuantization(bits=4, group_size=32).apply(tiny_lm)
    with pytest.raises(PPQConfigError, match="group_size=32"):
        ChannelPruning(ratio=0.5).apply(tiny_lm, dataloader=tiny_data.calibration_dataloader())


def test_shared_basis_layers_of_the_pruned_structure_are_refused(tiny_data):
    from ppq_lightning.callbacks import BasisSharing

    data = tiny_data.calibration_dataloader()
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    BasisSharing(group_size=2, ratio=0.9, projections=["down_proj"]).apply(module)
    weights = {n: p.clone() for n, p in module.named_parameters()}
    with pytest.raises(PPQConfigError, match=r"cannot shrink \['model.model.layers.0.mlp.down"):
        ChannelPruning(ratio=0.5).apply(module, dataloader=data)
    assert all(torch.equal(p, weights[n]) for n, p in module.named_parameters())
    # heads are another structure: a shared MLP projection does not stand in their way
    ChannelPruning(ratio=0.5, structure="heads").apply(module, dataloader=data)
    assert module.model.model.layers[0].self_attn.o_proj.in_features == 32
    # and the documented split: attention shared, MLP channels pruned
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    BasisSharing(group_size=2, ratio=0.9, projections=["q_proj", "k_proj", "v_proj"]).apply(module)
    ChannelPruning(ratio=0.5).apply(module, dataloader=data)
    assert module.model.model.layers[0].mlp.down_proj.in_features == 64
    assert check_invariants(module) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, "ratio=1.0"),
        ({"ratio": 0.5, "structure": "rows"}, "structure='rows'"),
        ({"ratio": 0.5, "num_calibration_batches": 0}, "num_calibration_batches=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        ChannelPruning(**kwargs)
