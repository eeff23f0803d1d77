"""Choosing which modules a stage compresses, by name, as YAML can say it."""

from __future__ import annotations

import re

from torch import nn

from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.modules.attention import attention_of, install_projection_views
from ppq_lightning.modules.boundary import boundary_layers, output_embeddings
from ppq_lightning.modules.views import is_compressible


def compile_patterns(patterns: str | list[str] | None, argument: str) -> list[re.Pattern]:
    """Compile one regex or a list of regexes.

    Raises:
        PPQConfigError: when ``patterns`` is not a string or list of strings, or a regex is
            invalid.
    """
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise bad_value(argument, patterns, "a regex string or a list of regex strings")
    compiled = []
    for pattern in items:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise bad_value(argument, pattern, f"a valid regular expression ({err})") from err
    return compiled


ADAPTER = re.compile(r"(^|\.)lora_(A|B)(\.|$)")


def _embedding_weights(model: nn.Module) -> set[int]:
    """Ids of weights that are embeddings: input embeddings, and output heads tied or declared."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return ids | {id(head.weight) for head in output_embeddings(model)}


def _check_untied(
    model: nn.Module, chosen: dict[str, nn.Module], targets: str | list[str] | None
) -> None:
    """Refuse a chosen layer whose weight is the same tensor as a module's left out (an LM head
    tied to the input embedding): compressing it would silently change that module too.

    Raises:
        PPQConfigError: naming the layer, the module it is tied to, and how to proceed.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(name)
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in chosen.items():
        # a projection view of an nn.MultiheadAttention owning separate q/k/v_proj_weight reads
        # that parameter whole: the attention that owns it is not a module tied to it
        attention = names.get(id(attention_of(module)))
        others = [
            o
            for o in owners.get(id(module.weight), ())
            if o != name and o not in chosen and o != attention
        ]
        if others:
            raise PPQConfigError(
                f"targets={targets!r} selects {name}, whose weight is tied to {others[0]} (the "
                f"same tensor, as tied input and output embeddings are): compressing {name} "
                f"would also change {others[0]}. Untie them first (e.g. a model built with "
                f"tie_word_embeddings=False, or a copy of the weight), or leave {name} out "
                "(`ignore`, or narrower `targets`)."
            )


def resolve_targets(
    model: nn.Module,
    targets: str | list[str] | None = None,
    ignore: str | list[str] | None = None,
) -> dict[str, nn.Module]:
    """The ``nn.Linear``/``nn.Conv2d``/GPT-2 ``Conv1D`` modules of ``model`` a stage compresses.

    Args:
        model: the module tree (names are relative to it, e.g. ``model.layers.0.mlp.up_proj``).
        targets: regex or list of regexes searched (``re.search``) in module names; None means
            the default targets: every linear and conv layer except embeddings (input ones,
            and the output embeddings a Hugging Face model declares, tied or not) and the
            model's boundary layers. The boundary is what the model lists in its
            ``default_ignore`` attribute when it has one (``ImageClassifierModule``: its stem
            and classifier); else its output layer and stem as a traced forward found them
            (``modules.boundary``: a stage traces one of its batches; Lightning's
            ``example_input_array`` is traced here); with neither, what timm models declare
            (``get_classifier()``, ``pretrained_cfg['first_conv']``). Without any of these
            (no data, no example input, no declaration) the output layer and stem of a model
            are default targets like any layer.
        ignore: regexes of module names to leave out, applied after ``targets``.

    LoRA adapter layers (``...lora_A.default``, ``...lora_B.default``) are never targets; the
    layer they adapt is (``...q_proj.base_layer``). An ``nn.MultiheadAttention``'s query, key
    and value projections are targets as ``...q_proj``/``k_proj``/``v_proj`` (views of its
    ``in_proj_weight``, installed here by ``modules.attention.install_projection_views``: no
    state-dict key and no output changes), its ``out_proj`` as itself.

    Raises:
        PPQConfigError: when a regex is invalid, nothing matches, or a chosen layer's weight is
            tied to a module that is not chosen (an LM head tied to the input embedding).
    """
    wanted = compile_patterns(targets, "targets")
    unwanted = compile_patterns(ignore, "ignore")
    install_projection_views(model)
    embeddings = _embedding_weights(model) if not wanted else set()
    exempt = set(getattr(model, "default_ignore", None) or ()) if not wanted else set()
    boundary = boundary_layers(model) if not wanted else {}
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_compressible(module) or ADAPTER.search(name):
            continue
        if wanted and not any(p.search(name) for p in wanted):
            continue
        if not wanted and (id(module.weight) in embeddings or name in exempt):
            continue
        if not wanted and _base_name(name) in boundary:
            continue
        if any(p.search(name) for p in unwanted):
            continue
        chosen[name] = module
    if not chosen:
        layers = [n for n, m in model.named_modules() if is_compressible(m)]
        sample = ", ".join(layers[:5]) or "none"
        left = [f"{n} (its {boundary[n]} layer)" for n in list(boundary)[:3]]
        why = (
            f" By default a model's output layer and stem stay dense: {', '.join(left)}; "
            "name them in `targets` to compress them."
            if left and not wanted
            else ""
        )
        raise PPQConfigError(
            f"targets={targets!r} with ignore={ignore!r} matched no nn.Linear/nn.Conv2d module. "
            f"The model has {len(layers)} such layers, e.g. {sample}.{why} Please check "
            "`targets`."
        )
    _check_untied(model, chosen, targets)
    return chosen


def _base_name(name: str) -> str:
    """The name a layer had before peft wrapped it (``...fc.base_layer`` -> ``...fc``)."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name
