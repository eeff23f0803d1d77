"""Which layer produced a tensor, seen from forward hooks, robust to reused ids.

Hooks that pair a layer's output with another layer's input cannot key tensors by ``id()``
alone: during a forward the intermediate tensors are freed as soon as nothing holds them, and
a new tensor is often allocated at the very address a freed one had, so it has the same
``id()`` (a ``conv`` whose output is freed after ``x * 2``, then ``relu`` of the product: the
``relu`` output shares the conv output's id). :class:`ProducedBy` keeps a weak reference to
each recorded tensor (the lookup checks it is *the same object*, never holding activations
alive) and its version counter (a tensor modified in place since, by ``relu_`` or
``ReLU(inplace=True)``, is the same object but no longer the producer's output).
"""

from __future__ import annotations

import weakref
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


def _version(tensor: Tensor) -> int | None:
    """The tensor's in-place version counter; None where it has none (inference tensors)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class ProducedBy(Generic[T]):
    """A map from tensors (the objects, not their ids) to whatever produced them."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int | None, T]] = {}

    def record(self, tensor: Tensor, producer: T) -> None:
        """Note that ``producer`` made ``tensor`` (a later record of the same object wins)."""
        self._entries[id(tensor)] = (weakref.ref(tensor), _version(tensor), producer)

    def get(self, tensor: object, unmodified: bool = True) -> T | None:
        """Who produced ``tensor``: None when it was not recorded (another object that
        happens to share a freed tensor's id included) or, with ``unmodified``, when it was
        modified in place since it was recorded."""
        if not isinstance(tensor, Tensor):
            return None
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        if unmodified and entry[1] != _version(tensor):
            return None
        return entry[2]
