"""Undo what a failed stage did to the layers it was compressing.

A layer-wise method (GPTQ, SparseGPT, Wanda) can fail in a late block: NaN activations, a
Cholesky factorisation that never succeeds, a device running out of memory. Without care the
earlier blocks stay compressed and the model is half of each. :func:`restored_on_error` keeps
a copy of every selected layer (its own parameters and buffers on the CPU, its children by
reference, its compression state by copy; for an ``nn.MultiheadAttention`` projection, which
owns no tensor, the attention's parameters) and, when the block it guards raises, puts each layer
back at its place with its original tensors, then re-raises with a note saying so. Parameters
keep their identity (``param.data`` is restored), so an optimizer that holds them stays valid.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ppq_lightning.modules.attention import AttentionProjection
from ppq_lightning.modules.tree import find_module, replace_module


@dataclass
class _Saved:
    module: nn.Module
    parameters: dict[str, nn.Parameter | None]  # the objects (an optimizer may hold them)
    buffers: dict[str, torch.Tensor | None]
    tensors: dict[str, torch.Tensor]  # their values, on the CPU
    children: dict[str, nn.Module]  # by reference, except the copies below
    copies: dict[str, nn.Module]  # children that stages edit in place (compression state)


def _save(module: nn.Module, copied: tuple[str, ...]) -> _Saved:
    own = {**module._parameters, **module._buffers}
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in own.items() if v is not None}
    children = dict(module._modules)
    copies = {k: copy.deepcopy(c) for k, c in children.items() if k in copied and c is not None}
    return _Saved(
        module, dict(module._parameters), dict(module._buffers), tensors, children, copies
    )


def _restore(model: nn.Module, name: str, saved: _Saved) -> None:
    module = saved.module
    if find_module(model, name) is not module:
        replace_module(model, name, module)
    module._parameters.clear()
    module._parameters.update(saved.parameters)
    module._buffers.clear()
    module._buffers.update(saved.buffers)
    for key, tensor in saved.tensors.items():
        current = saved.parameters.get(key, saved.buffers.get(key))
        current.data = tensor.to(device=current.device)
    module._modules.clear()
    module._modules.update(saved.children)
    module._modules.update(saved.copies)


def _viewed(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules whose parameters the views among ``modules`` write (the
    ``nn.MultiheadAttention`` of a ``q_proj``/``k_proj``/``v_proj``), by name."""
    owners = {id(m.attention) for m in modules.values() if isinstance(m, AttentionProjection)}
    return {name: m for name, m in model.named_modules() if id(m) in owners} if owners else {}


@contextmanager
def restored_on_error(
    model: nn.Module, modules: dict[str, nn.Module], copied: tuple[str, ...] = ("ppq_state",)
) -> Iterator[None]:
    """Guard a block that edits ``modules`` of ``model``: if it raises, every module is restored.

    Args:
        model: the model that holds ``modules`` (where replaced layers are put back).
        modules: ``{dotted name: module}`` the block may edit (weights, children, replacement).
        copied: names of children that may be edited in place, kept as deep copies.

    Raises:
        BaseException: whatever the block raised, after the restore, with a note that the
            layers were restored.
    """
    saved = {name: _save(module, copied) for name, module in modules.items()}
    for name, module in _viewed(model, modules).items():
        saved.setdefault(name, _save(module, copied))
    try:
        yield
    except BaseException as error:
        for name, entry in saved.items():
            _restore(model, name, entry)
        error.add_note(
            f"[ppq] the {len(modules)} layer(s) the stage was compressing were restored to their "
            "state before it; the model is as it was."
        )
        raise
