"""A model's boundary layers: the output layer and the stem, which default targets leave out.

Compression methods leave a model's output layer (its classifier, an LM's vocabulary projection)
and, for models fed images or features, its stem (the first layer reading the input) dense by
default, as the literature does. Names cannot tell them on any model, so they are found from
the graph of one forward (:func:`trace_boundary`):

- the **output layer**: a compressible layer whose output reaches the model's output (its
  first tensor, or ``logits``) through operations only, no layer with parameters between
  (``decoder`` then ``log_softmax`` and ``view`` in Lightning's demo Transformer; ``fc`` of a
  ResNet; an LM's ``lm_head``);
- the **stem**: a compressible layer whose input comes from the model's inputs through
  operations only (``conv1`` of a ResNet, a ViT's patch embedding). A language model has none:
  its input goes through an embedding first.

The trace follows every tensor through torch's operations (a ``TorchFunctionMode``), each layer
with parameters of its own starting a new origin; it runs the model once, in eval mode and
without gradients, and leaves nothing behind but a mark on the layers it found (so any module
tree holding them, the LightningModule or its inner network, knows them).

Where the example input comes from: a stage calls :func:`trace_boundary` with one of its
calibration (or evaluation) batches, and :func:`boundary_layers` traces on Lightning's
``example_input_array`` when the model has one. Without either, nothing is traced: the
boundary is what the model declares (timm's ``pretrained_cfg['first_conv']`` and
``get_classifier()``), and other models' output layer and stem count as ordinary layers.
A model that declares its ``default_ignore`` (``ImageClassifierModule``) is never traced:
that list is its boundary.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ppq_lightning.modules.attention import install_projection_views
from ppq_lightning.modules.views import is_compressible

MARK = "_ppq_boundary"
"""On a layer: ``"output"`` or ``"stem"``, as the last trace found it."""
TRACED = "_ppq_boundary_traced"
"""On a traced model: True (a model whose trace found no boundary layer is not traced again)."""
INNER_EMBEDDING = "_ppq_inner_embedding"
"""On an ``nn.Embedding``: True when the last trace saw it look up indices that another layer
computed (a codebook, say), not the model's input: not an input embedding, so the default
targets name it among the layers they leave out (``modules.targets.untaken_layers``)."""
_INPUT = "input"
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
"""Lookup tables: the default targets leave them out (an input embedding, by rule)."""


class _Origins(TorchFunctionMode):
    """Which origins (the model's input, layers with parameters) every tensor comes from."""

    def __init__(self) -> None:
        super().__init__()
        self._origins: dict[int, tuple[weakref.ref, frozenset]] = {}

    def of(self, value: Any) -> frozenset:
        found: frozenset = frozenset()
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, Tensor):
                entry = self._origins.get(id(leaf))
                if entry is not None and entry[0]() is leaf:
                    found |= entry[1]
        return found

    def set(self, value: Any, origins: frozenset) -> None:
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, Tensor):
                self._origins[id(leaf)] = (weakref.ref(leaf), origins)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        origins = self.of((args, kwargs))
        if origins:
            self.set(result, origins | self.of(result))  # an in-place op keeps what it had
            if getattr(func, "__name__", "") == "__setitem__" and args:
                self.set(args[0], origins)  # x[i] = y: x holds y's origins too
        return result


def _starts_origin(module: nn.Module) -> bool:
    """Whether a layer's output is an origin of its own: a compressible layer, or a layer
    with parameters of its own and no compressible layer inside (an embedding, a norm)."""
    if is_compressible(module):
        return True
    if not any(p is not None for p in module._parameters.values()):
        return False
    return not any(is_compressible(m) for m in module.modules() if m is not module)


def _first_tensor(output: Any) -> Tensor | None:
    """What the model predicts: ``logits`` when the output has them, else its first tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    leaves = [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, Tensor)]
    return leaves[0] if leaves else None


def clear_boundary(model: nn.Module) -> None:
    """Forget what an earlier trace found on ``model``."""
    model.__dict__.pop(TRACED, None)
    for module in model.modules():
        module.__dict__.pop(MARK, None)
        module.__dict__.pop(INNER_EMBEDDING, None)


def trace_boundary(model: nn.Module, run: Callable[[], Any]) -> dict[str, str]:
    """Find ``model``'s output layer and stem from one forward, and mark them on the layers.

    Args:
        model: the model (its layers are marked; names are relative to it).
        run: calls ``model`` once, e.g. ``lambda: forward_fn(model, batch)``; it runs in eval
            mode (the modules' modes are restored after) and without gradients.

    Returns:
        ``{layer name: "output" | "stem"}`` (a layer both is its output layer).
    """
    install_projection_views(model)  # an attention's projections are layers of the graph
    origins = _Origins()
    seen: dict[str, Any] = {}
    found: dict[str, str] = {}
    inner: set[str] = set()  # embeddings looking up indices another layer computed
    names = {id(m): n for n, m in model.named_modules()}

    def inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        origins.set((args, kwargs), frozenset({_INPUT}))

    def returned(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.setdefault("output", output)

    def reads(module: nn.Module, args: tuple) -> None:
        if is_compressible(module) and origins.of(args) == {_INPUT}:
            found.setdefault(names[id(module)], "stem")
        if isinstance(module, EMBEDDINGS) and origins.of(args) - {_INPUT}:
            inner.add(names[id(module)])

    def starts(module: nn.Module, args: tuple, output: Any) -> None:
        origins.set(output, frozenset({id(module)}))

    handles = [
        model.register_forward_pre_hook(inputs, with_kwargs=True),
        model.register_forward_hook(returned, with_kwargs=True),
    ]
    for module in model.modules():
        if module is not model and _starts_origin(module):
            handles.append(module.register_forward_pre_hook(reads))
            handles.append(module.register_forward_hook(starts))
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), origins:
            result = run()
            output = _first_tensor(seen.get("output", result))
            heads = origins.of(output) if output is not None else frozenset()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    for module in model.modules():
        if id(module) in heads and is_compressible(module):
            found[names[id(module)]] = "output"
    clear_boundary(model)
    for name, role in found.items():
        model.get_submodule(name).__dict__[MARK] = role
    for name in inner:
        model.get_submodule(name).__dict__[INNER_EMBEDDING] = True
    model.__dict__[TRACED] = True
    return found


def _on_device(value: Any, model: nn.Module) -> Any:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return value
    return tree_map(lambda t: t.to(parameter.device) if isinstance(t, Tensor) else t, value)


def _call_example(model: nn.Module, example: Any) -> Any:
    """Call ``model`` on ``example_input_array`` as Lightning's model summary does."""
    example = _on_device(example, model)
    if isinstance(example, (list, tuple)):
        return model(*example)
    if isinstance(example, dict):
        return model(**example)
    return model(example)


def declared_boundary(model: nn.Module) -> dict[str, str]:
    """The boundary timm models declare: ``get_classifier()`` and ``pretrained_cfg``'s
    ``first_conv`` (names the model gives itself), for models nothing traced."""
    found: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for module in model.modules():
        config = getattr(module, "pretrained_cfg", None)
        get_classifier = getattr(module, "get_classifier", None)
        if not isinstance(config, dict) or not callable(get_classifier):
            continue
        first = config.get("first_conv")
        for name in [first] if isinstance(first, str) else first or []:
            stem = _submodule(module, name)
            if stem is not None and is_compressible(stem):
                found[names[id(stem)]] = "stem"
        classifier = get_classifier()
        for head in classifier.modules() if isinstance(classifier, nn.Module) else ():
            if is_compressible(head):
                found[names[id(head)]] = "output"
    return found


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def output_embeddings(model: nn.Module) -> list[nn.Module]:
    """The output heads Hugging Face models declare (``get_output_embeddings()``)."""
    heads = []
    for module in model.modules():
        get_output = getattr(module, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else None
        if isinstance(head, nn.Module) and hasattr(head, "weight"):
            heads.append(head)
    return heads


def declares_boundary(model: nn.Module) -> bool:
    """Whether ``model`` says itself what default targets leave out, so nothing is traced:
    it lists ``default_ignore`` (``ImageClassifierModule``: its stem and classifier, unless
    ``compress_stem``/``compress_head``), or declares its output embeddings (a Hugging Face
    model: its LM head; a language model has no stem)."""
    return getattr(model, "default_ignore", None) is not None or bool(output_embeddings(model))


def boundary_known(model: nn.Module) -> bool:
    """Whether ``model`` was traced, or holds layers a trace marked."""
    return bool(model.__dict__.get(TRACED)) or any(MARK in m.__dict__ for m in model.modules())


def boundary_layers(model: nn.Module) -> dict[str, str]:
    """``model``'s output layer and stem that default targets leave out,
    ``{name: "output" | "stem"}``: the layers a trace marked (:func:`trace_boundary`); else,
    when the model has Lightning's ``example_input_array``, a trace on it now; else what timm
    models declare (``get_classifier()``, ``pretrained_cfg['first_conv']``); else nothing (the
    output layer and stem of an untraced model count as ordinary layers).

    Empty for a model that :func:`declares_boundary` (``default_ignore`` and the declared
    output embeddings are the rule there).
    """
    if declares_boundary(model):
        return {}
    if not boundary_known(model):
        example = getattr(model, "example_input_array", None)
        if example is not None:
            trace_boundary(model, lambda: _call_example(model, example))
    marked = {n: m.__dict__[MARK] for n, m in model.named_modules() if MARK in m.__dict__}
    return marked or declared_boundary(model)
