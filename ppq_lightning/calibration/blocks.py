"""The repeated blocks of a model: finding them, and running the model without some of them.

Blocks are found from the structure of the model (the largest ``nn.ModuleList`` /
``nn.Sequential`` of identical blocks: HF Llama, Mistral, Qwen2, OPT, GPT-2, timm ViTs, ...).
A model's Hugging Face configs follow its depth (``num_hidden_layers``, ``layer_types``), so
that its own forward builds the right masks for the blocks it runs.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from ppq_lightning.modules.tree import parent_of


def find_blocks(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The repeated blocks of ``model``: ``(name, container)`` or None when there are none.

    The container is the ``nn.ModuleList``/``nn.Sequential`` with the most parameters among
    those whose children (at least two) all have one class.
    """
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def _configs(model: nn.Module) -> list[object]:
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            seen.setdefault(id(config), config)
    return list(seen.values())


_DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


def set_depth(model: nn.Module, old: int, keep: list[int]) -> None:
    """Make HF configs agree with a block list of ``len(keep)`` blocks (was ``old``)."""
    for config in _configs(model):
        for field in _DEPTH_FIELDS:
            if getattr(config, field, None) == old:
                setattr(config, field, len(keep))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == old:
            config.layer_types = [layer_types[i] for i in keep]


def _depth_fields(model: nn.Module) -> list[tuple[object, str, object]]:
    """The HF config entries that :func:`set_depth` may change, to put back as they were."""
    return [
        (config, field, getattr(config, field))
        for config in _configs(model)
        for field in (*_DEPTH_FIELDS, "layer_types")
        if getattr(config, field, None) is not None
    ]


def renumber_blocks(blocks: nn.Module) -> None:
    """Give every block's modules with a ``layer_idx`` their block's new position."""
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


@contextlib.contextmanager
def without_blocks(
    model: nn.Module, name: str, drop: set[int], replace: dict[int, nn.Module] | None = None
) -> Iterator[None]:
    """Run ``model`` with the blocks ``drop`` of the container ``name`` left out, then restore.

    The HF configs' depth (``num_hidden_layers``, ``layer_types``) follows while in the context;
    the container and the configs are put back as they were whatever happens. Contexts nest
    (indices then refer to the container of the enclosing context).

    Args:
        model: the model.
        name: the name of the block container in ``model``.
        drop: the indices of the blocks to leave out.
        replace: modules to run in place of kept blocks, by index (their ``layer_types`` entry
            stays that of the block they stand for).
    """
    parent, attribute = parent_of(model, name)
    container = getattr(parent, attribute)
    keep = [i for i in range(len(container)) if i not in drop]
    saved = _depth_fields(model)
    setattr(parent, attribute, subset_blocks(container, keep, replace))
    try:
        set_depth(model, len(container), keep)
        yield
    finally:
        setattr(parent, attribute, container)
        for config, field, value in saved:
            setattr(config, field, value)


def subset_blocks(
    container: nn.Module, keep: list[int], replace: dict[int, nn.Module] | None = None
) -> nn.Module:
    """A new container of the same kind holding the blocks ``keep`` (or their ``replace``).

    Blocks named by position are renumbered (``0, 1, 2``, as ``nn.ModuleList`` does); blocks
    of an ``nn.Sequential(OrderedDict(...))`` with names of their own (torchvision's ViT:
    ``encoder_layer_0``...) keep them, so a kept block is found under its original name.
    """
    blocks = [(replace or {}).get(i, container[i]) for i in keep]
    if isinstance(container, nn.ModuleList):
        return nn.ModuleList(blocks)
    names = [name for name, _ in container.named_children()]
    if names == [str(i) for i in range(len(names))]:
        return nn.Sequential(*blocks)
    return nn.Sequential(OrderedDict((names[i], b) for i, b in zip(keep, blocks, strict=True)))


@dataclass(frozen=True)
class BlockChain:
    """The blocks a model runs one after the other, in execution order.

    The calibration engine walks them one at a time; whatever the model computes before a block
    (embeddings, masks, a stem) or between two blocks is run by the model's own forward when
    each block's inputs are captured (``calibration.capture.capture_chain_inputs``).

    Attributes:
        names: each block's full name in the model (``"model.layers.3"``, ``"layer2.0"``).
        blocks: the blocks.
        family: the rule that found them (``"resnet"``, ``"timm-blocks"``, ``"repeated"``...).
    """

    names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    family: str

    def __len__(self) -> int:
        return len(self.blocks)

    def index_of(self, layer: str) -> int | None:
        """The index of the block holding the module named ``layer`` (None: outside blocks)."""
        for index, name in enumerate(self.names):
            if layer == name or layer.startswith(name + "."):
                return index
        return None


def _flat(module: nn.Module, path: str) -> list[str]:
    """The children of the container ``path`` of ``module``, plain ``nn.Sequential`` children
    (stages of blocks) replaced by their own children."""
    paths = []
    for name, child in module.get_submodule(path).named_children():
        child_path = f"{path}.{name}"
        paths += _flat(module, child_path) if type(child) is nn.Sequential else [child_path]
    return paths


def _is_sequential(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Sequential)


def _resnet(module: nn.Module) -> list[str] | None:
    # torchvision and timm ResNets: layer1..layer4 of BasicBlock / Bottleneck (with downsample)
    if all(_is_sequential(module, f"layer{i}") for i in range(1, 5)):
        return [path for i in range(1, 5) for path in _flat(module, f"layer{i}")]
    return None


def _convnext(module: nn.Module) -> list[str] | None:
    # timm ConvNeXt: stages, each a downsample then its blocks
    stages = getattr(module, "stages", None)
    if not isinstance(stages, nn.Sequential) or not all(
        hasattr(s, "downsample") and _is_sequential(s, "blocks") for s in stages
    ):
        return None
    return [
        path
        for i in range(len(stages))
        for path in (f"stages.{i}.downsample", *_flat(module, f"stages.{i}.blocks"))
    ]


def _timm_blocks(module: nn.Module) -> list[str] | None:
    # timm EfficientNet / MobileNetV3 (blocks = stages of MBConv blocks), ViT / DeiT (blocks)
    if _is_sequential(module, "blocks") and len(_flat(module, "blocks")) >= 2:
        return _flat(module, "blocks")
    return None


def _torchvision_features(module: nn.Module) -> list[str] | None:
    # torchvision MobileNetV2/V3, EfficientNet: features (stem, MBConv stages, head conv)
    if _is_sequential(module, "features") and hasattr(module, "classifier"):
        return _flat(module, "features")
    return None


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is ``nn.Sequential``'s own: pure composition."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _edge_path(node: nn.Module, parts: list[str], child: int) -> bool:
    """Whether ``parts`` lead down from ``node`` through plain Sequentials, always to their
    child at position ``child`` (-1: the last, 0: the first)."""
    for part in parts:
        names = [name for name, _ in node.named_children()]
        if not _plain_sequential(node) or not names or names[child] != part:
            return False
        node = node.get_submodule(part)
    return True


def feeds_directly(model: nn.Module, earlier: str, later: str) -> bool:
    """Whether ``model``'s forward provably hands module ``later`` exactly the output of module
    ``earlier`` and nothing else: both sit in plain ``nn.Sequential`` containers (no custom
    forward) with nothing run between them, as consecutive blocks of a stage (``layer1.0`` ->
    ``layer1.1``) or the last block of a stage and the first of the next one when the stages
    are themselves children of a plain Sequential (timm's ``blocks.1.1`` -> ``blocks.2.0``).

    The calibration engine then hands ``later`` the outputs it just computed instead of
    capturing its arguments from another forward of the model (a stem pass saved per block).
    """
    first, second = earlier.split("."), later.split(".")
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    if common == len(first) or common == len(second):
        return False  # one holds the other
    ancestor = model.get_submodule(".".join(first[:common]))
    names = [name for name, _ in ancestor.named_children()]
    if not _plain_sequential(ancestor) or first[common] not in names:
        return False
    position = names.index(first[common])
    if position + 1 >= len(names) or names[position + 1] != second[common]:
        return False
    return _edge_path(ancestor.get_submodule(first[common]), first[common + 1 :], -1) and (
        _edge_path(ancestor.get_submodule(second[common]), second[common + 1 :], 0)
    )


FAMILIES: tuple[tuple[str, Callable[[nn.Module], list[str] | None]], ...] = (
    ("resnet", _resnet),
    ("convnext", _convnext),
    ("timm-blocks", _timm_blocks),
    ("torchvision-features", _torchvision_features),
)
"""Block discovery per family: name -> rule giving the block paths of a module (or None)."""


def find_block_chain(model: nn.Module) -> BlockChain | None:
    """The blocks of ``model`` in execution order, or None when none are found.

    The outermost module that a family rule of :data:`FAMILIES` recognises (ResNet stages,
    ConvNeXt stages, timm ``blocks``, torchvision ``features``) gives its blocks; otherwise
    the children of the largest container of identical blocks (:func:`find_blocks`: the
    decoder layers of HF causal LMs, or any repeated blocks).
    """
    for prefix, module in model.named_modules():
        for family, rule in FAMILIES:
            paths = rule(module)
            if paths:
                names = tuple(f"{prefix}.{p}" if prefix else p for p in paths)
                return BlockChain(names, tuple(model.get_submodule(n) for n in names), family)
    found = find_blocks(model)
    if found is None:
        return None
    name, container = found
    children = list(container.named_children())  # their own names (Sequential(OrderedDict))
    names = tuple(f"{name}.{child}" if name else child for child, _ in children)
    return BlockChain(names, tuple(block for _, block in children), "repeated")
