"""Every method on nn.MultiheadAttention (Lightning's demo Transformer, a torchvision ViT): its
Q/K/V (in_proj_weight) and out_proj are compressed, counted and trained."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.demos import LightningTransformer
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    GPTQ,
    BasisSharing,
    DeadZoneQuantization,
    DepGraphPruning,
    LoRAFineTune,
    MagnitudePruning,
    QuantizationAwareTraining,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.compressed.state import get_state
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.attention import fastpath_disabled
from ppq_lightning.modules.targets import resolve_targets

VOCAB = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class Demo(LightningTransformer):
    """Lightning's demo Transformer as shipped (no WikiText2 download in tests)."""

    def prepare_data(self) -> None:
        pass


def _demo() -> Demo:
    torch.manual_seed(0)
    return Demo(vocab_size=VOCAB)


def _loader(n: int = 4) -> DataLoader:
    tokens = torch.randint(0, VOCAB, (n, 9), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)


def _forward(model: nn.Module, batch: list) -> torch.Tensor:
    return model(*batch)


def _attentions(module: nn.Module) -> dict[str, nn.MultiheadAttention]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _trainer(callbacks: list, steps: int = 2) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


STAGES = {
    "magnitude": lambda: MagnitudePruning(sparsity=0.5),
    "rtn": lambda: RTNQuantization(bits=4),
    "gptq": lambda: GPTQ(bits=4, num_calibration_batches=2),
    "sparsegpt": lambda: SparseGPT(sparsity=0.5, num_calibration_batches=2),
    "wanda": lambda: Wanda(sparsity=0.5, num_calibration_batches=2),
    "wanda 2:4": lambda: Wanda(pattern="2:4", num_calibration_batches=2),
}


@pytest.mark.parametrize("method", list(STAGES))
def test_every_weight_method_compresses_and_counts_the_attention_projections(method):
    module = _demo()
    stage = STAGES[method]()
    stage.forward_fn = _forward
    result = stage.apply(module, dataloader=_loader())
    attentions = _attentions(module)
    assert len(attentions) == 6  # encoder self, decoder self and cross attention
    for name, attention in attentions.items():
        for projection in PROJECTIONS:
            state = get_state(attention.get_submodule(projection))
            assert state is not None and state.stages == [stage.state_key], (name, projection)
        if method in ("rtn", "gptq"):
            assert attention.q_proj.ppq_state.bits == 4
        else:
            zeros = (attention.in_proj_weight == 0).float().mean().item()
            assert zeros == pytest.approx(0.5, abs=0.01), name
    check_invariants(module)
    counted = resolve_targets(module)
    in_proj = sum(a.in_proj_weight.numel() for a in attentions.values())
    assert result.summary.n_weights == sum(m.weight.numel() for m in counted.values())
    assert result.summary.n_weights > in_proj  # the Q/K/V weights are counted
    if method not in ("rtn", "gptq"):
        assert result.summary.sparsity == pytest.approx(0.5, abs=0.01)


def _first_loss(callbacks: list) -> float:
    class FirstLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = outputs["loss"].item() if batch_idx == 0 else self.loss

    module, first = _demo(), FirstLoss()
    module.model.eval()  # no dropout: the losses compare the weights the forward uses
    module.train = lambda mode=True: module  # Lightning would switch dropout back on
    _trainer([*callbacks, first], steps=1).fit(module, _loader())
    return first.loss


@pytest.mark.parametrize("layer", ["self_attn.q_proj", "self_attn.out_proj"])
def test_qat_trains_through_the_fake_quantized_attention_projection(layer):
    target = rf"encoder\.layers\.0\.{layer}$"
    dense = _first_loss([])
    quantized = _first_loss([QuantizationAwareTraining(bits=2, targets=target)])
    assert quantized != pytest.approx(dense, abs=1e-6)  # the forward used the 2-bit weight


def test_qat_and_codeq_end_with_every_projection_on_its_grid():
    for stage in (QuantizationAwareTraining(bits=4), DeadZoneQuantization(bits=4)):
        module = _demo()
        _trainer([MagnitudePruning(sparsity=0.5), stage]).fit(module, _loader())
        for attention in _attentions(module).values():
            for projection in PROJECTIONS:
                state = get_state(attention.get_submodule(projection))
                assert state.bits == 4 and state.mask is not None
        check_invariants(module)
        assert stage.result.summary.sparsity == pytest.approx(0.5, abs=0.01)


def test_lora_adapters_on_the_attention_projections_train_count_and_reload():
    module = _demo()
    attention = module.model.transformer.encoder.layers[0].self_attn
    base = attention.in_proj_weight.detach().clone()
    stage = LoRAFineTune(r=4, target_modules=r"encoder\.layers\.0\.self_attn")
    _trainer([stage], steps=3).fit(module, _loader())
    for projection in PROJECTIONS:
        layer = attention.get_submodule(projection)
        assert isinstance(layer, LoraLayer), projection
        assert layer.lora_B["default"].weight.abs().sum() > 0, projection  # it trained
    assert torch.equal(attention.in_proj_weight, base)  # the frozen base, bit for bit
    adapters = sum(p.numel() for n, p in module.named_parameters() if ".lora_" in n)
    assert stage.result.summary.measured_C == pytest.approx(
        stage.result.summary.n_weights / (stage.result.summary.n_weights + adapters)
    )
    tokens = next(iter(_loader()))
    module.eval()
    with torch.no_grad():
        output = module(*tokens)  # batch_first encoder layers in eval: torch's fused kernel
        with fastpath_disabled():
            assert torch.equal(module(*tokens), output)
    fresh = _demo()
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*tokens), output)


def test_lora_merged_into_a_quantized_attention_stays_on_its_grid():
    module = _demo()
    rtn = RTNQuantization(bits=4)
    lora = LoRAFineTune(r=4, merge="at_end", target_modules=r"encoder\.layers\.0\.self_attn")
    _trainer([rtn, lora], steps=3).fit(module, _loader())
    attention = module.model.transformer.encoder.layers[0].self_attn
    assert type(attention.q_proj).__name__ == "AttentionProjection"  # the adapters are merged
    assert lora.result.layers["model.transformer.encoder.layers.0.self_attn.q_proj"]
    check_invariants(module)


def test_a_gptq_compressed_demo_reloads_into_a_fresh_model():
    module = _demo()
    stage = GPTQ(bits=4, num_calibration_batches=2)
    stage.forward_fn = _forward
    stage.apply(module, dataloader=_loader())
    fresh = _demo()
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict(), strict=True)
    tokens = next(iter(_loader()))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*tokens), module.eval()(*tokens))
    assert check_invariants(fresh) == check_invariants(module)


def test_basis_sharing_refuses_an_attention_projection_before_any_change():
    module = _demo()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(PPQConfigError, match=r"q_proj, a view of the in_proj_weight"):
        BasisSharing(group_size=2, ratio=0.5, projections=["q_proj"]).apply(module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_depgraph_keeps_a_compressed_attention_whole():
    """DepGraph pruning after the attention's projections were quantized leaves the attention
    (its embedding width, its rows and their grids) as it was and prunes the MLP channels."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    )  # fmt: skip
    images = [torch.randn(2, 3, 32, 32)]
    RTNQuantization(bits=4, group_size=None, targets="self_attention").apply(vit)
    attention = vit.encoder.layers[0].self_attention
    before = attention.in_proj_weight.detach().clone()
    DepGraphPruning(ratio=0.25).apply(vit, dataloader=images)
    assert torch.equal(attention.in_proj_weight, before)
    assert vit.encoder.layers[0].mlp[0].out_features == 24
    check_invariants(vit)
