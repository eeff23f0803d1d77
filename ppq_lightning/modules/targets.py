"""Choosing which modules a stage compresses, by name, as YAML can say it."""

from __future__ import annotations

import re
import warnings
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ppq_lightning.errors import PPQConfigError, bad_value
from ppq_lightning.modules.attention import (
    AttentionProjection,
    attention_of,
    install_projection_views,
)
from ppq_lightning.modules.boundary import (
    EMBEDDINGS,
    INNER_EMBEDDING,
    boundary_layers,
    output_embeddings,
)
from ppq_lightning.modules.views import COMPRESSIBLE, is_compressible


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


class ComputedWeightWarning(UserWarning):
    """Default targets left out layers whose weight is computed from other parameters
    (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``)."""


class UntakenLayerWarning(UserWarning):
    """Default targets left out layers that hold weights but are of a type no method takes
    (``nn.ConvTranspose1d``, ``nn.LSTM``, a user's own layer with a ``weight`` Parameter)."""


_NORMALIZATIONS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_UNTAKEN_WARNED = "_ppq_untaken_warned"  # on a model: the layers its last warning named


def _holds_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is the module's own: a parameter or buffer of it, or computed
    from its own parameters (a parametrization, ``weight_norm``/``spectral_norm`` hooks), not
    a property reading another module's (peft's wrappers read their ``base_layer``'s)."""
    if "weight" in module._parameters or "weight" in module._buffers:
        return True
    if parametrize.is_parametrized(module, "weight"):
        return True
    return any(
        isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == "weight"
        for hook in module._forward_pre_hooks.values()
    )


def weights_of(module: nn.Module) -> int:
    """How many weights ``module`` holds itself, as a weight matrix counts them (0 for none):
    its own ``weight`` when that is a floating tensor of two or more dimensions (a parameter,
    or one a parametrization or ``weight_norm`` computes from the module's parameters), else its
    own parameters named ``weight_...`` with two or more dimensions (an ``nn.LSTM``'s
    ``weight_ih_l0``, ...). Biases, normalization scales and other vectors are not weights
    here."""
    if _holds_weight(module):
        weight = module.weight
        usable = isinstance(weight, Tensor) and weight.is_floating_point()
        return weight.numel() if usable and weight.dim() >= 2 else 0
    return sum(
        p.numel()
        for n, p in module._parameters.items()
        if p is not None and n.startswith("weight") and p.is_floating_point() and p.dim() >= 2
    )


def untaken_layers(model: nn.Module) -> dict[str, int]:
    """The layers of ``model`` that hold weights (:func:`weights_of`) but are of a type no
    method compresses, ``{name: weights}``: transposed convolutions, recurrent layers,
    ``nn.Bilinear``, a user's own layer with a ``weight`` Parameter, and an ``nn.Embedding``
    that a trace saw look up indices another layer computed (``modules.boundary``). Not listed:
    compressible layers (:func:`~ppq_lightning.modules.views.is_compressible`), input
    embeddings and output embeddings (left out by rule), normalizations, LoRA adapters,
    ``nn.MultiheadAttention`` (its projections are compressible views), and layers whose weight
    is the weight of a compressible layer (tied)."""
    taken = {id(m.weight) for m in model.modules() if is_compressible(m)}
    declared = {id(head) for head in output_embeddings(model)}
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        if is_compressible(module) or id(module) in declared or ".lora_" in f".{name}":
            continue
        if isinstance(module, (*_NORMALIZATIONS, nn.MultiheadAttention)):
            continue
        if isinstance(module, EMBEDDINGS) and not module.__dict__.get(INNER_EMBEDDING):
            continue
        if id(getattr(module, "weight", None)) in taken:
            continue
        count = weights_of(module)
        if count:
            found[name] = count
    return found


def _warn_untaken(model: nn.Module, ignore: list[re.Pattern], chosen: dict[str, nn.Module]) -> None:
    """One :class:`UntakenLayerWarning` naming the layers :func:`untaken_layers` finds (those
    ``ignore`` does not name), once per model and set of layers."""
    untaken = {
        n: c for n, c in untaken_layers(model).items() if not any(p.search(n) for p in ignore)
    }
    if not untaken or model.__dict__.get(_UNTAKEN_WARNED) == sorted(untaken):
        return
    model.__dict__[_UNTAKEN_WARNED] = sorted(untaken)
    modules = dict(model.named_modules())
    listed = ", ".join(
        f"{n} ({type(modules[n]).__name__}, {c:,} weights)" for n, c in list(untaken.items())[:5]
    )
    more = f" and {len(untaken) - 5} more" if len(untaken) > 5 else ""
    total = sum(untaken.values())
    selected = sum(m.weight.numel() for m in chosen.values())
    warnings.warn(
        f"[ppq] default targets leave out {len(untaken)} layer(s) holding {total:,} weights "
        f"whose type no method compresses: {listed}{more}. The methods take {COMPRESSIBLE} "
        f"layers ({selected:,} weights selected here). The layers left out stay dense, and the "
        "compression rate counts them as dense weights (n_weights and C include them; "
        "docs/definitions.md). List them in `ignore` to silence this warning.",
        UntakenLayerWarning,
        stacklevel=3,
    )


class ComputedWeight(NamedTuple):
    """What computes a layer's weight (``what``) and how to undo it (``fix``), in words."""

    what: str
    fix: str


def computed_weight(module: nn.Module) -> ComputedWeight | None:
    """How ``module.weight`` is computed when it is not a tensor the module holds, or None.

    A stage writes its result into ``module.weight``; a weight that the module recomputes from
    other parameters on every access or forward (``torch.nn.utils.parametrize``:
    ``parametrizations.weight_norm``, ``parametrizations.spectral_norm``, a user's
    ``register_parametrization``; the hook-based ``torch.nn.utils.weight_norm`` and
    ``spectral_norm``) would lose it: the layer's forward keeps its old weight while a mask and
    a grid are recorded. ``nn.MultiheadAttention``'s projection views (``modules.attention``)
    read the attention's parameter and are not computed.

    Returns:
        What computes the weight and how to remove it (for messages), or None for a weight the
        module holds as a parameter or buffer.
    """
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        return ComputedWeight(
            f"a torch.nn.utils.parametrize parametrization ({kinds})",
            'torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")',
        )
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return ComputedWeight(
                "torch.nn.utils.weight_norm (from weight_g and weight_v)",
                "torch.nn.utils.remove_weight_norm(layer)",
            )
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            return ComputedWeight(
                "torch.nn.utils.spectral_norm (from weight_orig)",
                "torch.nn.utils.remove_spectral_norm(layer)",
            )
    if isinstance(module, AttentionProjection):
        return None
    if "weight" not in module._parameters and "weight" not in module._buffers:
        return ComputedWeight(
            "something other than the layer (neither a parameter nor a buffer of it)",
            "make the weight an nn.Parameter of the layer",
        )
    return None


def _check_untied(
    model: nn.Module, chosen: dict[str, nn.Module], targets: str | list[str] | None
) -> None:
    """Refuse a chosen layer whose weight is the same tensor as another module's: one left out
    (an LM head tied to the input embedding), whose weight compressing it would silently change;
    or one chosen too (two layers holding one ``nn.Parameter``), which a stage would compress
    twice, recording two masks or grids (GPTQ's two Hessians, mixed precision's two bit widths)
    of which the shared tensor can hold only the last.

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
        shared = [o for o in owners.get(id(module.weight), ()) if o != name and o in chosen]
        if shared:
            raise PPQConfigError(
                f"targets={targets!r} selects {name} and {shared[0]}, which hold the same "
                f"weight (one nn.Parameter shared by both layers): a stage would compress that "
                "tensor twice and record two masks or grids it cannot both be on. Untie them "
                f"(give one its own copy: layer.weight = nn.Parameter(layer.weight.detach()"
                f".clone())), or leave both out (`ignore`: leaving one out still changes it "
                "through the other)."
            )
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
    *,
    include_computed: bool = False,
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
        include_computed: return layers whose weight is computed (see below) like any other,
            without refusing or warning: for callers that only read the layers (the compression
            rate counts them as dense layers).

    A layer whose weight is computed from other parameters (:func:`computed_weight`:
    ``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``) cannot be compressed:
    named by ``targets`` it is refused; the default targets leave it out with a
    :class:`ComputedWeightWarning` naming it and how to remove the parametrization.

    Layers that hold weights but are of a type no method takes (:func:`untaken_layers`:
    ``nn.ConvTranspose1d``, ``nn.LSTM``, a user's own layer with a ``weight`` Parameter) are
    never targets; the default targets name them in one :class:`UntakenLayerWarning` (with their
    weight counts, once per model), unless ``ignore`` names them. The compression rate counts
    them as dense weights (``compressed.accounting``).

    LoRA adapter layers (``...lora_A.default``, ``...lora_B.default``) are never targets; the
    layer they adapt is (``...q_proj.base_layer``). An ``nn.MultiheadAttention``'s query, key
    and value projections are targets as ``...q_proj``/``k_proj``/``v_proj`` (views of its
    ``in_proj_weight``, installed here by ``modules.attention.install_projection_views``: no
    state-dict key and no output changes), its ``out_proj`` as itself.

    Raises:
        PPQConfigError: when a regex is invalid, nothing matches, ``targets`` select a layer
            whose weight is computed, a chosen layer's weight is tied to a module that is not
            chosen (an LM head tied to the input embedding), or two chosen layers hold one
            weight ``nn.Parameter``; each naming the layers.
    """
    wanted = compile_patterns(targets, "targets")
    unwanted = compile_patterns(ignore, "ignore")
    install_projection_views(model)
    embeddings = _embedding_weights(model) if not wanted else set()
    exempt = set(getattr(model, "default_ignore", None) or ()) if not wanted else set()
    boundary = boundary_layers(model) if not wanted else {}
    chosen: dict[str, nn.Module] = {}
    computed: dict[str, ComputedWeight] = {}  # layers whose weight is computed (computed_weight)
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
        how = None if include_computed else computed_weight(module)
        if how is not None:
            computed[name] = how
            continue
        chosen[name] = module
    if computed and wanted:
        name, how = next(iter(computed.items()))
        raise PPQConfigError(
            f"targets={targets!r} selects {name}, whose weight is computed by {how.what}: a "
            "stage writes its result into the weight, which the layer recomputes from other "
            "parameters, so it would keep its old weight while a mask and grid were recorded. "
            f"Undo that first ({how.fix}), or leave the layer out (ignore={name!r}, or "
            f"narrower `targets`).{_more(computed)} Nothing was changed."
        )
    if computed and chosen:
        warnings.warn(
            f"[ppq] default targets leave out {len(computed)} layer(s) whose weight is computed "
            f"from other parameters, which a stage cannot compress: {_listed(computed)} "
            f"({next(iter(computed.values())).what}). To compress them, undo that first "
            f"({next(iter(computed.values())).fix}) and name them in `targets`.",
            ComputedWeightWarning,
            stacklevel=2,
        )
    if not wanted and not include_computed and chosen:
        _warn_untaken(model, unwanted, chosen)
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
        if computed:
            why += (
                f" The default targets left out {_listed(computed)}, whose weight is computed "
                f"by {next(iter(computed.values())).what} (undo that to compress them: "
                f"{next(iter(computed.values())).fix})."
            )
        raise PPQConfigError(
            f"targets={targets!r} with ignore={ignore!r} matched no {COMPRESSIBLE} module. "
            f"The model has {len(layers)} such layers, e.g. {sample}.{why}{_untaken_note(model)} "
            "Please check `targets`."
        )
    _check_untied(model, chosen, targets)
    return chosen


def _untaken_note(model: nn.Module) -> str:
    """For the error of an empty selection: the layers of types no method takes, if any."""
    untaken = untaken_layers(model)
    if not untaken:
        return ""
    modules = dict(model.named_modules())
    kinds = sorted({type(modules[n]).__name__ for n in untaken})
    return (
        f" Its layers of other types ({', '.join(kinds)}: {_listed(untaken)}) are not "
        "compressed by any method."
    )


def _listed(layers: dict[str, Any]) -> str:
    """Up to three layer names of ``layers`` and how many more."""
    names = list(layers)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _more(layers: dict[str, Any]) -> str:
    """The other layers of ``layers`` beyond the first, for a message ("" when none)."""
    rest = dict.fromkeys(list(layers)[1:])
    return f" It also selects {_listed(rest)}, whose weights are computed too." if rest else ""


def _base_name(name: str) -> str:
    """The name a layer had before peft wrapped it (``...fc.base_layer`` -> ``...fc``)."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name
