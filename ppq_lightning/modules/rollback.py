"""Undo what a failed stage did to the layers it was compressing.

A layer-wise method (GPTQ, SparseGPT, Wanda) can fail in a late block: NaN activations, a
Cholesky factorisation that never succeeds, a device running out of memory. Without care the
earlier blocks stay compressed and the model is half of each. :func:`restored_on_error` keeps
what every selected layer holds (its own parameters and buffers, its children by reference, its
compression state by copy; for an ``nn.MultiheadAttention`` projection, which owns no tensor, the
attention's parameters) and, when the block it guards raises, puts each layer back at its place
with its original tensors, then re-raises with a note saying so. Parameters keep their identity
(``param.data`` is restored), so an optimizer that holds them stays valid.

The copy costs no resident memory (``modules.offload.snapshot``): weights on disk are kept by
reference (a mapped view is never written), and weights in memory are written to a temporary
folder (``tempfile``'s, i.e. ``$TMPDIR``) and memory-mapped, so a stage's memory is one block,
not the model a second time; the folder is deleted when the stage ends, and one a killed
process left is deleted by the next stage to run. Tensors under one page
(biases, norms, scales) are copied in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ppq_lightning.modules.attention import AttentionProjection
from ppq_lightning.modules.offload import snapshot, spill_folder, stored
from ppq_lightning.modules.tree import find_module, replace_module


@dataclass
class _Saved:
    module: nn.Module
    parameters: dict[str, nn.Parameter | None]  # the objects (an optimizer may hold them)
    buffers: dict[str, torch.Tensor | None]
    tensors: dict[str, torch.Tensor]  # their values, on the CPU
    children: dict[str, nn.Module]  # by reference, except the copies below
    copies: dict[str, nn.Module]  # children that stages edit in place (compression state)


def _save(module: nn.Module, copied: tuple[str, ...], spill: Path) -> _Saved:
    own = {**module._parameters, **module._buffers}
    tensors = snapshot({k: v for k, v in own.items() if v is not None}, spill)
    children = dict(module._modules)
    copies = {}
    for key, child in children.items():
        if key in copied and child is not None:  # its tensors kept as snapshots, not copied
            values = child.state_dict(keep_vars=True).values()
            inner = {str(i): t for i, t in enumerate(v for v in values if isinstance(v, Tensor))}
            kept = snapshot(inner, spill)
            memo = {id(inner[i]): kept[i] for i in inner}
            copies[key] = copy.deepcopy(child, memo)
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
        stays = stored(tensor) and current.device == tensor.device  # a view of the store
        current.data = tensor if stays else tensor.to(device=current.device, copy=True)
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
    with spill_folder() as spill:
        saved = {name: _save(module, copied, spill) for name, module in modules.items()}
        for name, module in _viewed(model, modules).items():
            saved.setdefault(name, _save(module, copied, spill))
        try:
            yield
        except BaseException as error:
            for name, entry in saved.items():
                _restore(model, name, entry)
            error.add_note(
                f"[ppq] the {len(modules)} layer(s) the stage was compressing were restored to "
                "their state before it; the model is as it was."
            )
            raise
