"""A compression method's configuration: every argument that can change the weights it produces.

Each method declares one frozen dataclass of its arguments (as torchao's quantization configs and
peft's ``LoraConfig``), validated in ``__post_init__``. The stage's *identity* is derived from
all of its fields, so nothing that changes the result can be left out of it by hand, and nothing
cosmetic (the stage's display name, what it logs, where it runs) can enter it: those are
arguments of the Lightning callback, not of the config. See docs/definitions.md ("A stage's
identity").

Example (what a method file declares)::

    @dataclass(frozen=True, kw_only=True)
    class RTNConfig(StageConfig):
        bits: int
        group_size: int | None = None

        def __post_init__(self) -> None:
            super().__post_init__()
            check_bits(self.bits)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from ppq_lightning.errors import bad_value, plain_number
from ppq_lightning.modules.targets import compile_patterns
from ppq_lightning.ops.grid_formats import INT, GridSpec, check_grid_format
from ppq_lightning.ops.masks import parse_pattern, resolve_sparsity


def canonical(value: Any) -> Any:
    """``value`` in one spelling per meaning: tuples as lists, dicts keyed by strings in their
    given order (an order can carry meaning: in ``layer_bits`` the first matching regex wins)."""
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def _accepts_float(annotation: Any) -> bool:
    """Whether a field's type is ``float`` or an optional/union with ``float`` in it."""
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_float(a) for a in typing.get_args(annotation))
    return False


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """The arguments shared by every method: which modules it compresses.

    Args:
        targets: regex or list of regexes of module names to compress (``re.search``); None for
            the default targets (every ``nn.Linear``/``nn.Conv1d/2d/3d`` except embeddings, the LM
            head and, for classifiers, the stem and the classifier).
        ignore: regexes of module names to leave uncompressed.

    Raises:
        PPQConfigError: on a pattern that is not a string or list of strings, or an invalid regex.
    """

    targets: str | list[str] | None = None
    ignore: str | list[str] | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # np.float32(0.5), torch.tensor(4): numbers
            value = getattr(self, field.name)
            if plain_number(value) is not value:
                object.__setattr__(self, field.name, plain_number(value))
        compile_patterns(self.targets, "targets")
        compile_patterns(self.ignore, "ignore")

    def arguments(self) -> dict[str, Any]:
        """Every field, canonically spelled, keys sorted (``targets="mlp"`` and
        ``targets=["mlp"]`` select the same modules and read the same; an integer given for a
        float field reads as that float)."""
        hints = typing.get_type_hints(type(self))
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is int and _accepts_float(hints[field.name]):
                value = float(value)  # 1 and 1.0 are one sparsity: one spelling
            values[field.name] = canonical(value)
        for key in ("targets", "ignore"):
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
        return dict(sorted(values.items()))


def identity(method: str, arguments: dict[str, Any]) -> str:
    """A stage's identity: its method and every argument that can change the weights it produces,
    ``Method{'arg': value, ...}`` with the arguments canonical and sorted."""
    return f"{method}{canonical(arguments)!r}"


def is_legacy_key(key: str) -> bool:
    """Whether a recorded state key was written before identities covered every argument (those
    keys hold the stage's ``name`` inside their arguments: ``Method{'name': None, ...}``)."""
    return "{'name': " in key


@dataclass(frozen=True, kw_only=True)
class SparsityConfig(StageConfig):
    """A pruning target: a fraction of zeros, unstructured or ``N:M``.

    Args:
        sparsity: target fraction of pruned weights, in [0, 1); optional for ``N:M`` (where it
            is ``1 - N/M``, and a given one must equal that). Stored resolved.
        pattern: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive input weights).

    Raises:
        PPQConfigError: on a bad pattern, a sparsity outside [0, 1), a missing sparsity for
            unstructured pruning, or one that contradicts N:M.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sparsity", resolve_sparsity(self.sparsity, self.pattern)[0])

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M pattern, None for unstructured."""
        return parse_pattern(self.pattern)


@dataclass(frozen=True, kw_only=True)
class GridConfig(StageConfig):
    """The grid a quantizer rounds to: its format and shape (the bits are the method's own
    ``bits`` field; for every format but ``int`` the format fixes them).

    Args:
        format: ``"int"`` (a uniform integer grid), ``"nvfp4"``, ``"mxfp4"``, ``"fp8"``,
            ``"fp8_block"``, ``"Q4_K"``, ``"Q5_K"``, ``"Q6_K"`` or ``"Q4_K_M"`` (llama.cpp's
            per-layer mixture); see ``ops.grid_formats``. Stored in its canonical spelling.
        group_size: consecutive input weights sharing one scale/zero; None for one per output
            channel (the format's own group for the other formats).
        symmetric: a grid centred on zero (no stored zero point) instead of min-max; None for
            the format's own (False for ``int``).

    Raises:
        PPQConfigError: an unknown format, a group size that is not a positive integer,
            ``symmetric`` not a bool, or bits, a group size or a symmetry the format
            contradicts.

    Example (YAML)::

        init_args: {format: nvfp4}             # bits 4, groups of 16, symmetric: implied
        init_args: {bits: 4, group_size: 128}  # format: int
    """

    format: str = INT
    group_size: int | None = None
    symmetric: bool | None = None

    bits_off: ClassVar[bool] = False
    """Whether ``bits=16`` means "off" (RTN's sweeps include the unquantized point)."""
    bits_optional: ClassVar[bool] = False
    """Whether ``bits=None`` on the ``int`` format means "no quantization" (SparseGPT)."""
    formats: ClassVar[tuple[str, ...] | None] = None
    """The formats the method can round to (None: all)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        fmt = check_grid_format(self.format, "format")
        if self.formats is not None and fmt not in self.formats:
            raise bad_value("format", self.format, f"one of {', '.join(self.formats)}")
        bits = getattr(self, "bits", None)
        if fmt == INT and bits is None and self.bits_optional:
            spec = GridSpec.of(INT, 2, self.group_size, self.symmetric)
            resolved = {"format": INT, "group_size": spec.group_size, "symmetric": spec.symmetric}
        else:
            spec = GridSpec.of(fmt, bits, self.group_size, self.symmetric, allow_off=self.bits_off)
            resolved = {
                "format": spec.format,
                "bits": spec.bits,
                "group_size": spec.group_size,
                "symmetric": spec.symmetric,
            }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def grid(self) -> GridSpec | None:
        """The stage's grid choice (None when ``bits`` is None: no quantization)."""
        bits = getattr(self, "bits", None)
        if bits is None:
            return None
        return GridSpec(self.format, bits, self.group_size, bool(self.symmetric))
