"""``nn.MultiheadAttention``'s projections as linear layers the compression methods handle.

``nn.MultiheadAttention`` keeps its query, key and value projections in one parameter,
``in_proj_weight`` (``(3E, E)``, with ``in_proj_bias``), or in three (``q_proj_weight``,
``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``), and
its forward (``F.multi_head_attention_forward``, or torch's fused kernel in eval mode) reads
them and ``out_proj.weight`` as tensors: no ``nn.Linear`` of Q/K/V exists, and ``out_proj``'s
own forward (its hooks, a weight transform, a LoRA wrapper) never runs.

:func:`install_projection_views` gives every ``nn.MultiheadAttention`` of a model three
children, ``q_proj``, ``k_proj`` and ``v_proj``: :class:`AttentionProjection` layers, ``nn.Linear``
whose ``weight`` and ``bias`` are views of the attention's own parameters (writing into them
writes ``in_proj_weight``). They own no tensor, so the model's ``state_dict`` keeps its keys
(``in_proj_weight``, ``out_proj.weight``, ...) and checkpoints load as before; a compressed
projection adds its ``q_proj.ppq_state`` like any compressed layer.

The attention's forward stays torch's own, bit for bit (its fast path included), until one of
its projections must run as a module: it has forward hooks (the calibration engine's
statistics), a weight transform (QAT, CoDeQ), or was replaced (a LoRA wrapper). Then, for that
call, the attention computes through its modules (:func:`forward_through_projections`:
``q_proj(query)``, ``k_proj(key)``, ``v_proj(value)``, attention, ``out_proj(attention
output)``), the same computation as torch's slow path. ``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder``, whose eval-mode fast path computes with ``in_proj_weight``,
``linear1`` and ``linear2`` as tensors, leave that fast path for such a call too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppq_lightning.errors import PPQConfigError

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
"""The names of the query, key and value projections installed on an attention module."""
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_ATTENTION = "_ppq_attention"  # on a projection (and out_proj): the attention it belongs to
_FUSED = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


class AttentionProjection(nn.Linear):
    """The query, key or value projection of an ``nn.MultiheadAttention`` as an ``nn.Linear``
    that owns no tensor: its ``weight`` and ``bias`` are views of the attention's parameters
    (rows of ``in_proj_weight``/``in_proj_bias``, or ``q_proj_weight``, ...), read anew on every
    access, so they follow the attention to another device or dtype and writing into them
    (``weight.data``) writes the attention's parameter.

    Args:
        attention: the ``nn.MultiheadAttention`` (kept as a plain reference, not a child).
        index: 0 (query), 1 (key) or 2 (value).
    """

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: no parameter of its own
        self.__dict__[_ATTENTION] = attention
        self.index = index

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.weight.shape[0]

    @property
    def attention(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` whose projection this is."""
        return self.__dict__[_ATTENTION]

    @property
    def parameter_name(self) -> str:
        """The attention's parameter holding this projection's weight."""
        return "in_proj_weight" if self.attention._qkv_same_embed_dim else _SEPARATE[self.index]

    def _rows(self) -> slice:
        size = self.attention.embed_dim
        return slice(self.index * size, (self.index + 1) * size)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        attention = self.attention
        if attention._qkv_same_embed_dim:
            return attention.in_proj_weight[self._rows()]
        return getattr(attention, _SEPARATE[self.index])

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        bias = self.attention.in_proj_bias
        return None if bias is None else bias[self._rows()]

    def weight_grad(self) -> Tensor | None:
        """The gradient of this projection's rows of the attention's parameter (a view), or
        None when it has none."""
        grad = getattr(self.attention, self.parameter_name).grad
        if grad is None or not self.attention._qkv_same_embed_dim:
            return grad
        return grad[self._rows()]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias", "in_features", "out_features"):
            raise PPQConfigError(
                f"the {PROJECTIONS[self.index]} of an nn.MultiheadAttention is a view of its "
                f"{self.parameter_name}: it cannot be given another {name} (a method that "
                "replaces or reshapes layers cannot edit it; list it in `ignore`)."
            )
        super().__setattr__(name, value)

    def reset_parameters(self) -> None:
        """Nothing: the attention's own ``_reset_parameters`` initialises its tensors."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, view of {self.parameter_name}"


def attention_of(module: nn.Module) -> nn.MultiheadAttention | None:
    """The ``nn.MultiheadAttention`` whose projection ``module`` is (a Q/K/V view or its
    ``out_proj``, once :func:`install_projection_views` ran), or None."""
    return module.__dict__.get(_ATTENTION)


def routable(attention: nn.MultiheadAttention) -> bool:
    """Whether ``attention`` can compute through its projection modules: its forward is
    ``nn.MultiheadAttention``'s own (a subclass overriding ``forward`` computes something this
    module does not reproduce)."""
    return type(attention).forward is nn.MultiheadAttention.forward


def _plain(module: nn.Module | None) -> bool:
    """Whether torch may compute with ``module``'s weight as a tensor instead of calling it:
    a plain layer with no hook and no forward of its own (a weight transform), not a wrapper
    (LoRA's)."""
    if module is None:
        return True
    own_forward = module.__dict__.get("forward")
    if own_forward is not None and getattr(own_forward, "func", None) is not _dispatch:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    return type(module) in (AttentionProjection, nn.Linear) or (
        type(module) is nn.modules.linear.NonDynamicallyQuantizableLinear
    )


def needs_modules(attention: nn.MultiheadAttention) -> bool:
    """Whether one of ``attention``'s projections must run as a module (see the module
    docstring): hooked, transformed or replaced. Never while its views are out of the model
    (:func:`projection_views_hidden`): it then computes as torch's own module."""
    children = attention._modules
    if not all(n in children for n in PROJECTIONS):
        return False
    return any(not _plain(children.get(n)) for n in (*PROJECTIONS, "out_proj"))


def _fused_need_modules(layer: nn.Module) -> bool:
    """Whether a layer torch may run as one fused kernel (``nn.TransformerEncoderLayer``, or a
    stack of them) holds a module that must run as a module."""
    for module in layer.modules():
        if isinstance(module, nn.MultiheadAttention) and needs_modules(module):
            return True
        if isinstance(module, nn.TransformerEncoderLayer) and not (
            _plain(module.linear1) and _plain(module.linear2)
        ):
            return True
    return False


@contextlib.contextmanager
def fastpath_disabled() -> Iterator[None]:
    """Turn torch's fused attention and encoder-layer kernels off while in the context
    (``torch.backends.mha.set_fastpath_enabled``), then restore the setting."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _dispatch(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward installed on an attention or a fused encoder layer: the class's own, unless
    a projection must run as a module (then through the projections, without a fused kernel)."""
    if isinstance(module, nn.MultiheadAttention):
        if needs_modules(module):
            return forward_through_projections(module, *args, **kwargs)
    elif _fused_need_modules(module):
        with fastpath_disabled():
            return type(module).forward(module, *args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def _install_dispatch(module: nn.Module) -> None:
    current = module.__dict__.get("forward")
    if current is None:
        module.__dict__["forward"] = partial(_dispatch, module)


def install_projection_views(model: nn.Module) -> list[str]:
    """Give every ``nn.MultiheadAttention`` of ``model`` its ``q_proj``/``k_proj``/``v_proj``
    views and the forward that calls its projections when they must run (see the module
    docstring); fused encoder layers get the forward that leaves their fast path then.
    Idempotent; the ``state_dict`` keys and the model's outputs are unchanged.

    An attention whose class overrides ``forward`` gets the views (methods that only read and
    write weights handle them, and the compression rate counts them) but keeps its forward:
    what must run its projections as modules refuses them (:func:`check_runs_modules`).

    Args:
        model: any module tree.

    Returns:
        The names of the views added now.

    Raises:
        PPQConfigError: when an attention already has a child or attribute named ``q_proj``,
            ``k_proj`` or ``v_proj`` that is not its view.
    """
    added = []
    for name, module in list(model.named_modules()):
        if isinstance(module, _FUSED) and type(module).forward in (
            nn.TransformerEncoderLayer.forward,
            nn.TransformerEncoder.forward,
        ):
            _install_dispatch(module)
        if not isinstance(module, nn.MultiheadAttention):
            continue
        for index, child in enumerate(PROJECTIONS):
            existing = getattr(module, child, None)
            if isinstance(existing, nn.Module) and attention_of(_base(existing)) is module:
                continue
            if existing is not None:
                raise PPQConfigError(
                    f"{name or type(module).__name__} (an nn.MultiheadAttention) already has "
                    f"an attribute {child!r}; its query/key/value projections cannot be exposed "
                    "as layers under that name. Rename the attribute."
                )
            module.add_module(child, AttentionProjection(module, index))
            added.append(f"{name}.{child}" if name else child)
        if isinstance(module.out_proj, nn.Module):
            _base(module.out_proj).__dict__[_ATTENTION] = module
            module._modules["out_proj"] = module._modules.pop("out_proj")  # q, k, v, out
        if routable(module):
            _install_dispatch(module)
    return added


@contextlib.contextmanager
def projection_views_hidden(model: nn.Module) -> Iterator[None]:
    """Take every attention's ``q_proj``/``k_proj``/``v_proj`` out of ``model`` while in the
    context, and put them back (in their place, before ``out_proj``) whatever happens.

    For a tracer that hooks every ``nn.Linear`` and maps the graph onto layers (Torch-Pruning's
    ``DependencyGraph``): hooked, the views would run as layers of their own, and the tracer
    would reshape them instead of the attention it knows how to prune.
    """
    hidden: list[tuple[nn.MultiheadAttention, dict[str, nn.Module]]] = []
    try:
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention):
                views = {n: module._modules.pop(n) for n in PROJECTIONS if n in module._modules}
                hidden.append((module, views))
        yield
    finally:
        for attention, views in hidden:
            attention._modules.update(views)
            if "out_proj" in attention._modules:
                attention._modules["out_proj"] = attention._modules.pop("out_proj")


def _base(module: nn.Module) -> nn.Module:
    """The layer a wrapper (peft's LoRA layer) wraps, or ``module``."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def check_runs_modules(layers: dict[str, nn.Module], why: str) -> None:
    """Refuse attention projections that cannot run as modules: those of an
    ``nn.MultiheadAttention`` subclass whose own ``forward`` computes with the weights.

    Args:
        layers: ``{name: layer}`` that must run as modules.
        why: what needs it (``"calibration statistics"``, ``"a weight transform"``, ...).

    Raises:
        PPQConfigError: naming the first such layer, the reason and the fix.
    """
    for name, layer in layers.items():
        attention = attention_of(_base(layer))
        if attention is not None and not routable(attention):
            raise PPQConfigError(
                f"{name} is a projection of {type(attention).__name__}, an "
                "nn.MultiheadAttention subclass with its own forward, which computes with the "
                f"projection weights as tensors: {why} need its forward to run as a module. "
                "List it in `ignore` (or use a method that needs no activations, e.g. "
                "MagnitudePruning or RTNQuantization)."
            )


def forward_through_projections(
    attention: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` (torch's slow path, ``F.multi_head_attention_forward``)
    with the projections called as modules: ``q_proj(query)``, ``k_proj(key)``,
    ``v_proj(value)`` and ``out_proj`` on the attention output ``(L * N, E)``.

    Arguments and outputs are those of ``nn.MultiheadAttention.forward``.
    """
    num_heads, embed_dim = attention.num_heads, attention.embed_dim
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if attention.batch_first and is_batched:  # keep the "is" relations (shared statistics)
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, _ = query.shape
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False
    head_dim = embed_dim // num_heads

    q = attention.q_proj(query)
    k = attention.k_proj(key)
    v = attention.v_proj(value)

    if attn_mask is not None and attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, key.shape[0]):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                f"{(tgt_len, key.shape[0])}."
            )
        attn_mask = attn_mask.unsqueeze(0)
    if attention.bias_k is not None and attention.bias_v is not None:
        k = torch.cat([k, attention.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, attention.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if attention.add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, k.new_zeros(zeros)], dim=1)
        v = torch.cat([v, v.new_zeros(zeros)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = attention.dropout if attention.training else 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        output = attention.out_proj(output).view(tgt_len, bsz, -1)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            output, weights = output.squeeze(1), weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        output = attention.out_proj(output).view(tgt_len, bsz, -1)
        weights = None
        if not is_batched:
            output = output.squeeze(1)
    if attention.batch_first and is_batched:
        output = output.transpose(1, 0)
    return output, weights
