import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    CompressionSchedule,
    DepGraphPruning,
    MagnitudePruning,
    RTNQuantization,
)
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.compressed.state import applied_stages, get_state
from ppq_lightning.edits import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import ImageClassifierModule
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import make_trainer

TINY_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def _resnet() -> ImageClassifierModule:
    return ImageClassifierModule("resnet18", num_classes=10, model_kwargs=TINY_RESNET)


def _vit() -> ImageClassifierModule:
    return ImageClassifierModule("vit_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIT)


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,)))
        for _ in range(n)
    ]


def _loader() -> DataLoader:
    batches = _batches()
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)


def test_a_tiny_resnet_really_shrinks():
    module, batches = _resnet(), _batches()
    parameters = _parameters(module)
    stage = DepGraphPruning(ratio=0.3)
    result = stage.apply(module, dataloader=batches)
    assert _parameters(module) < 0.7 * parameters
    assert result.kind == "P" and set(result.layers) == {"model"}
    assert result.layers["model"]["removed_weights"] > 0
    model = module.model
    assert model.conv1.out_channels == 64  # the stem is in default_ignore: its outputs stay
    assert model.fc.out_features == 10  # so is the classifier
    assert model.layer1[0].conv1.out_channels == 11
    assert _outputs(module, batches[0][0]).shape == (4, 10)
    assert stage.state_key in applied_stages(module)
    (entry,) = get_state(module).history
    assert (entry["method"], entry["kind"], entry["ratio"]) == ("DepGraphPruning", "P", 0.3)


def test_removed_weights_raise_the_measured_compression():
    module = _resnet()
    dense = compression_summary(module, 32)
    assert dense.measured_C == 1.0
    DepGraphPruning(ratio=0.3).apply(module, dataloader=_batches())
    summary = compression_summary(module, 32)
    assert summary.measured_C > 1.8
    assert summary.sparsity > 0.4  # removed weights count as zeros
    assert summary.avg_bits == 32  # nothing quantized


def test_removed_weights_keep_the_dense_weight_count():
    module = _resnet()
    dense = compression_summary(module, 32)
    DepGraphPruning(ratio=0.3).apply(module, dataloader=_batches())
    assert compression_summary(module, 32).n_weights == dense.n_weights


def test_ignore_keeps_output_channels():
    module = _resnet()
    DepGraphPruning(ratio=0.3, ignore=r"layer1\.0\.conv1$").apply(module, dataloader=_batches())
    assert module.model.layer1[0].conv1.out_channels == 16
    assert module.model.layer1[1].conv1.out_channels == 11


def test_a_vit_loses_heads_and_still_runs():
    module, batches = _vit(), _batches()
    parameters = _parameters(module)
    DepGraphPruning(ratio=0.5, prune_heads=True).apply(module, dataloader=batches)
    heads = [block.attn.num_heads for block in module.model.blocks]
    assert all(h < 3 for h in heads)
    assert _parameters(module) < parameters
    assert module.model.patch_embed.proj.out_channels == 192  # protected: the embedding dim
    assert module.model.head.out_features == 10
    assert _outputs(module, batches[0][0]).shape == (4, 10)
    assert get_state(module).history[0]["num_heads"] == {
        f"model.blocks.{i}.attn": h for i, h in enumerate(heads)
    }


def test_earlier_masks_and_grids_stay_valid(tmp_path):
    module = _resnet()
    schedule = CompressionSchedule(
        [MagnitudePruning(sparsity=0.5), RTNQuantization(bits=4), DepGraphPruning(ratio=0.3)]
    )
    make_trainer(tmp_path, [schedule]).validate(module, dataloaders=_loader(), verbose=False)
    assert [r.kind for r in schedule.results] == ["P", "Q", "P"]
    targets = resolve_targets(module)
    assert check_invariants(module) == len(targets) == 20  # the root's record has no weight
    for name, layer in targets.items():
        state = get_state(layer)
        assert state.mask.shape == layer.weight.shape, name
        assert (layer.weight[~state.mask] == 0).all(), name
        assert state.grid.scale.shape == (layer.weight.shape[0], 1), name
    assert schedule.results[-1].summary.measured_C > schedule.results[1].summary.measured_C


def test_a_grouped_grid_that_would_lose_input_channels_is_refused_unchanged():
    module = _resnet()
    RTNQuantization(bits=4, group_size=16).apply(module)
    state = copy.deepcopy(module.state_dict())
    with pytest.raises(PPQConfigError, match=r"cannot remove input columns .*group_size=16"):
        DepGraphPruning(ratio=0.3).apply(module, dataloader=_batches())
    after = module.state_dict()
    assert list(after) == list(state)
    assert all(
        torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in state.items()
    )
    assert get_state(module) is None


def test_the_pruned_module_reloads_into_a_fresh_one():
    module, batches = _resnet(), _batches()
    MagnitudePruning(sparsity=0.4).apply(module)
    DepGraphPruning(ratio=0.3).apply(module, dataloader=batches)
    expected = _outputs(module, batches[0][0])
    fresh = _resnet()
    enable_state_loading(fresh)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(_outputs(fresh, batches[0][0]), expected)
    assert _parameters(fresh) == _parameters(module)
    assert check_invariants(fresh) == check_invariants(module) == 20


def test_in_validate_it_fires_once_and_is_skipped_when_already_applied(tmp_path):
    module = _resnet()
    first = DepGraphPruning(ratio=0.3)
    (metrics,) = make_trainer(tmp_path, [first]).validate(
        module, dataloaders=_loader(), verbose=False
    )
    assert first.result is not None and 0 <= metrics["val/acc"] <= 1
    parameters = _parameters(module)
    again = DepGraphPruning(ratio=0.3)
    make_trainer(tmp_path, [again]).validate(module, dataloaders=_loader(), verbose=False)
    assert again._applied and again.result is None
    assert _parameters(module) == parameters
    assert len(get_state(module).history) == 1


def test_it_needs_an_example_batch():
    with pytest.raises(PPQConfigError, match=r"needs calibration data"):
        DepGraphPruning(ratio=0.3).apply(_resnet())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, r"ratio=1.0 is not allowed: expected a number in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio=-0.1 is not allowed"),
        ({"ratio": "0.3"}, r"ratio='0.3' is not allowed"),
        ({"ratio": 0.3, "round_to": 0}, r"round_to=0 is not allowed: expected None or an int"),
        ({"ratio": 0.3, "round_to": 2.0}, r"round_to=2.0 is not allowed"),
        ({"ratio": 0.3, "prune_heads": "yes"}, r"prune_heads='yes' is not allowed: expected tr"),
        ({"ratio": 0.3, "ignore": "["}, r"ignore='\[' is not allowed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PPQConfigError, match=match):
        DepGraphPruning(**kwargs)


def test_stage_config_and_round_to():
    stage = DepGraphPruning(ratio=0.25, round_to=8, name="C")
    assert stage.stage_config() == {
        "ignore": None,
        "prune_heads": False,
        "ratio": 0.25,
        "round_to": 8,
        "targets": None,
    }
    module = _resnet()
    stage.apply(module, dataloader=_batches())
    model = module.model
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert all(m.out_channels % 8 == 0 for m in convs)


def _torchvision_vit() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip


def test_a_torchvision_vit_loses_mlp_channels_and_computes_what_zeroing_them_does():
    """torchvision's ViT reads ``hidden_dim`` in its forward and its ``nn.MultiheadAttention``s
    take the embedding width: the groups through them are left whole, the MLPs' hidden channels
    go, and the pruned model computes what the dense one does with those channels zeroed."""
    vit, x = _torchvision_vit().eval(), torch.randn(4, 3, 32, 32)
    dense = copy.deepcopy(vit)
    DepGraphPruning(ratio=0.25).apply(vit, dataloader=[(x, torch.zeros(4))])
    assert vit.hidden_dim == vit.conv_proj.out_channels == 32
    for block, original in zip(vit.encoder.layers, dense.encoder.layers, strict=True):
        assert block.self_attention.embed_dim == 32 and block.self_attention.num_heads == 2
        rows, before = block.mlp[0].weight, original.mlp[0].weight
        assert rows.shape == (48, 32) and block.mlp[3].weight.shape == (32, 48)
        kept = [i for i in range(64) if any(torch.equal(before[i], r) for r in rows)]
        removed = [i for i in range(64) if i not in kept]
        with torch.no_grad():  # the dense model with the removed hidden channels zeroed
            original.mlp[0].weight[removed] = 0
            original.mlp[0].bias[removed] = 0
    with torch.no_grad():
        torch.testing.assert_close(vit(x), dense(x))


class _KeywordNet(nn.Module):
    """A module called as ``model(**batch)`` on dicts, the way HF models and many users' modules
    are: Torch-Pruning used to trace it with one positional tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 10)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        hidden = self.features(batch["image"]).mean(dim=(2, 3))
        return self.head(hidden * batch["scale"][:, None])


def test_a_forward_taking_keyword_batches_is_traced_with_its_own_call_and_replays():
    batch = {"image": torch.randn(4, 3, 8, 8), "scale": torch.ones(4), "label": torch.zeros(4)}
    model = _KeywordNet().eval()
    DepGraphPruning(ratio=0.5).apply(model, dataloader=[batch])
    assert model.features[3].out_channels == 8 and model.head.out_features == 10
    entry = get_state(model).history[0]
    assert entry["example"]["kwargs"]["scale"] == {"shape": [1], "dtype": "float32"}
    fresh = _KeywordNet().eval()
    enable_state_loading(fresh)
    fresh.load_state_dict(model.state_dict())  # the replay traces the recorded call
    with torch.no_grad():
        assert torch.equal(fresh(**batch), model(**batch))
