import torch

from ppq_lightning.edits.channel_units import depgraph_units, mlp_units
from ppq_lightning.edits.depgraph import attention_heads
from ppq_lightning.models import CausalLMModule, ImageClassifierModule
from tests.helpers import TINY_LLAMA


def test_mlp_units_remove_producer_rows_and_consumer_columns():
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    down = "model.model.layers.0.mlp.down_proj"
    width = module.get_submodule(down).in_features
    scores = {down: torch.arange(width, dtype=torch.float)}  # channel 0 least important
    (unit,) = mlp_units(module, [down], scores, [1.0, 0.5])
    assert unit.layers[0] == {}
    removed = unit.removed[1]
    assert removed.tolist() == list(range(width // 2))
    layers = unit.layers[1]
    assert torch.equal(layers[down][1], removed) and layers[down][0].numel() == 0
    for producer in ("gate_proj", "up_proj"):
        rows, cols = layers[f"model.model.layers.0.mlp.{producer}"]
        assert torch.equal(rows, removed) and cols.numel() == 0


def test_resnet_groups_map_input_channels_to_kernel_columns():
    torch.manual_seed(0)
    module = ImageClassifierModule(
        "resnet18", num_classes=10, model_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16}
    )
    ignored = [module.get_submodule(n) for n in module.default_ignore]
    units, _ = depgraph_units(module, torch.randn(1, 3, 32, 32), ignored, [1.0, 0.75])
    assert units
    for unit in units:
        removed = unit.removed[1]
        assert removed.numel() == round(0.25 * unit.channels)
        for name, (rows, cols) in unit.layers[1].items():
            layer = module.get_submodule(name)
            if rows.numel():
                assert rows.numel() == removed.numel()
            if cols.numel() and isinstance(layer, torch.nn.Conv2d):
                kernel = layer.kernel_size[0] * layer.kernel_size[1]
                assert cols.numel() == removed.numel() * kernel


def test_vit_units_leave_out_groups_through_layernorm_and_attention():
    module = ImageClassifierModule(
        "vit_tiny_patch16_224",
        num_classes=10,
        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
    )
    ignored = [module.get_submodule(n) for n in module.default_ignore]
    heads = set(attention_heads(module))
    units, _ = depgraph_units(module, torch.randn(1, 3, 32, 32), ignored, [1.0, 0.5], heads)
    touched = {name for u in units for name in u.layers[1]}
    assert touched  # the MLPs' hidden channels
    assert all(name.endswith(("mlp.fc1", "mlp.fc2")) for name in touched)
