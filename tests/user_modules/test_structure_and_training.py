"""Structured pruning and the training stages through a real Trainer on users' modules, and
the errors a user meets where a method cannot run: naming the layer, the reason and the fix,
before any weight changes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ppq_lightning import PPQConfigError, check_invariants, compression_summary
from ppq_lightning.callbacks import (
    BlockRemoval,
    ChannelPruning,
    DepGraphPruning,
    LoRAFineTune,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from tests.user_modules import checks, modules


def trainer(tmp_path, stage, **kwargs) -> L.Trainer:
    return L.Trainer(
        callbacks=[stage],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        **kwargs,
    )


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize(
    "make, loader",
    [
        (modules.UserCausalLM, modules.token_dicts),
        (lambda: modules.UserClassifier("torchvision_vit"), modules.images),
    ],
    ids=["hf_causal_lm", "torchvision_vit"],
)
def test_block_removal_removes_a_block(make, loader, tmp_path):
    model = make()
    blocks = sum(
        1 for _ in model.modules() if type(_).__name__.endswith(("DecoderLayer", "EncoderBlock"))
    )
    trainer(tmp_path, BlockRemoval(n_blocks=1, num_calibration_batches=2)).validate(
        model, dataloaders=loader(), verbose=False
    )
    after = sum(
        1 for _ in model.modules() if type(_).__name__.endswith(("DecoderLayer", "EncoderBlock"))
    )
    assert after == blocks - 1
    assert compression_summary(model).sparsity > 0


def test_channel_pruning_shrinks_the_mlps_of_a_users_llm(tmp_path):
    """MLP channel pruning of an HF LM inside a user's module with ``forward(**batch)``: every
    MLP loses its share of intermediate channels and the model still runs on the user's batches."""
    model = modules.UserCausalLM()
    trainer(tmp_path, ChannelPruning(ratio=0.25, num_calibration_batches=2)).validate(
        model, dataloaders=modules.token_dicts(), verbose=False
    )
    for layer in model.model.model.layers:
        assert layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features == 48
    with torch.no_grad():
        assert model(**next(iter(modules.token_dicts()))).loss.isfinite()
    assert compression_summary(model).sparsity > 0


@pytest.mark.parametrize(
    "make, loader",
    [
        (lambda: modules.UserClassifier("torchvision_resnet18"), modules.images),
        (lambda: modules.UserClassifier("timm_resnet10t"), modules.images),
        (lambda: modules.UserClassifier("torchvision_vit"), modules.images),
    ],
    ids=["torchvision_resnet18", "timm_resnet", "torchvision_vit"],
)
def test_depgraph_pruning_keeps_the_model_running(make, loader, tmp_path):
    model = make()
    before = sum(p.numel() for p in model.parameters())
    trainer(tmp_path, DepGraphPruning(ratio=0.25)).validate(
        model, dataloaders=loader(), verbose=False
    )
    assert sum(p.numel() for p in model.parameters()) < before
    batch = next(iter(loader()))
    with torch.no_grad():  # the pruned model still runs on the user's batches
        model(**batch) if isinstance(batch, dict) else model(batch[0])


@pytest.mark.parametrize(
    "make, loader",
    [
        (modules.UserCausalLM, modules.token_dicts),
        (lambda: modules.UserClassifier("torchvision_vit"), modules.images),
        (modules.demo_transformer, modules.token_pairs),
    ],
    ids=["hf_causal_lm", "torchvision_vit", "demo_transformer"],
)
def test_lora_adapters_train_on_every_targeted_layer(make, loader, tmp_path):
    """Every adapter LoRA puts on the model trains (``nn.MultiheadAttention``'s projections
    included: its ``out_proj`` is called functionally by torch), and the base stays as it was."""
    model = make()
    base = parameters(model)
    trainer(tmp_path, LoRAFineTune(r=4), max_steps=2).fit(model, train_dataloaders=loader())
    adapters = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert adapters
    untrained = [n for n, p in adapters.items() if not p.detach().abs().sum() > 0]
    assert not untrained  # lora_B starts at zero: a nonzero B was trained
    state = model.state_dict()
    for name, tensor in base.items():
        if name in state and "lora_" not in name:
            assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize(
    "make, loader",
    [
        (modules.UserCausalLM, modules.token_dicts),
        (lambda: modules.UserClassifier("torchvision_vit"), modules.images),
        (lambda: modules.UserClassifier("torchvision_resnet18"), modules.images),
    ],
    ids=["hf_causal_lm", "torchvision_vit", "torchvision_resnet18"],
)
def test_qat_leaves_every_targeted_matrix_on_its_grid(make, loader, tmp_path):
    model = make()
    trainer(tmp_path, QuantizationAwareTraining(bits=3), max_steps=2).fit(
        model, train_dataloaders=loader()
    )
    check_invariants(model)
    summary = compression_summary(model)
    compressed = [n for n, m in checks.weight_matrices(model).items() if m.numel()]
    assert summary.n_layers > 0 and compressed
    assert summary.avg_bits == pytest.approx(3.0)


def test_depgraph_refuses_an_hf_language_model_and_names_what_prunes_it(tmp_path):
    """Torch-Pruning's group search does not finish on an HF causal LM (it ran for minutes on
    this two-layer Llama): the stage refuses at once, naming ChannelPruning and BlockRemoval,
    before any weight changes."""
    model = modules.UserCausalLM()
    before = parameters(model)
    with pytest.raises(PPQConfigError, match=r"ChannelPruning.*BlockRemoval"):
        trainer(tmp_path, DepGraphPruning(ratio=0.25)).validate(
            model, dataloaders=modules.token_dicts(), verbose=False
        )
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_a_model_with_only_an_output_layer_names_it(tmp_path):
    """Lightning's ``BoringModel`` is one output layer: the defaults leave it dense, so the
    stage refuses, naming the layer and how to target it, before any weight changes."""
    model = modules.boring_model()
    before = parameters(model)
    with pytest.raises(PPQConfigError, match=r"layer.*targets"):
        trainer(tmp_path, MagnitudePruning(sparsity=0.5)).validate(model, verbose=False)
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())
    trainer(tmp_path, MagnitudePruning(sparsity=0.5, targets="layer")).validate(
        model, verbose=False
    )
    assert checks.zero_fraction(model.layer.weight) == 0.5
