"""The one table of compression methods: short name -> callback (and its config class).

The CLI, the experiment scripts, the vision and LLM benchmarks and the sweeps build stages from
it, so a new method is registered once, here. A stage is written as a *spec*::

    METHOD[:INTENSITY][,ARGUMENT=VALUE...]

``METHOD`` is a short name below; ``INTENSITY`` sets the method's intensity argument in its own
units (``sparsity``/``ratio`` as a fraction, ``bits``, LoRA's ``r``, the joint search's
``budget``); every other argument of the method's config (or ``device``) follows as
``name=value`` (``true``/``false``/``none``, numbers, or text). Examples::

    rtn:4                               # RTNQuantization(bits=4)
    rtn:nvfp4                           # RTNQuantization(format="nvfp4"): a grid format as
    gptq:Q4_K_M                         # a quantizer's intensity (ops.grid_formats)
    gptq:3,group_size=128,act_order=true
    wanda:0.5,scope=layer
    sparsegpt,pattern=2:4               # N:M: the sparsity follows from the pattern
    sharing:0.8,group_size=2,whiten=true

Example (a sweep or an experiment script reads the same table)::

    from ppq_lightning.callbacks.registry import build_stage
    stage = build_stage("gptq:4,damp=0.05", name="Q4", num_calibration_batches=32)
    same = build_stage("gptq,damp=0.05", 4, name="Q4", num_calibration_batches=32)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from ppq_lightning.callbacks.base import CompressionCallback
from ppq_lightning.callbacks.basis_sharing import BasisSharing
from ppq_lightning.callbacks.batchnorm import BatchNormRecalibration, FoldBatchNorm
from ppq_lightning.callbacks.block_removal import BlockRemoval
from ppq_lightning.callbacks.channel_pruning import ChannelPruning
from ppq_lightning.callbacks.dead_zone import DeadZoneQuantization
from ppq_lightning.callbacks.depgraph_pruning import DepGraphPruning
from ppq_lightning.callbacks.gptq import GPTQ
from ppq_lightning.callbacks.joint_search import JointStructuralMixedPrecision
from ppq_lightning.callbacks.lora import LoRAFineTune
from ppq_lightning.callbacks.magnitude_pruning import MagnitudePruning
from ppq_lightning.callbacks.qat import QuantizationAwareTraining
from ppq_lightning.callbacks.rtn_quantization import RTNQuantization
from ppq_lightning.callbacks.sparsegpt import SparseGPT
from ppq_lightning.callbacks.sqs import SQS
from ppq_lightning.callbacks.stage import CompressionStage
from ppq_lightning.callbacks.wanda import Wanda
from ppq_lightning.errors import PPQConfigError, bad_value, check_choice
from ppq_lightning.modules.config import StageConfig


def callback_signature(cls: type[CompressionCallback]) -> dict[str, inspect.Parameter]:
    """Every argument a compression callback class takes, by name: those of its own
    ``__init__`` and of every base's it passes ``**kwargs`` on to (its config's fields and the
    adapter's ``name``, ``b_orig``, ``log_layers``, ``at_epoch``, ``at_step``, ``forward_fn``,
    ``device`` where it has one); a subclass's parameter (and its default) wins."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, CompressionStage):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    found.setdefault(p.name, p)
    return found


def callback_parameters(cls: type[CompressionCallback]) -> set[str]:
    """The names of :func:`callback_signature`."""
    return set(callback_signature(cls))


@dataclass(frozen=True)
class Method:
    """One registered compression method.

    Attributes:
        name: the short name in specs, CLI choices and tables (``"gptq"``).
        callback: the Lightning callback that applies it.
        intensity: the argument a spec's ``:INTENSITY`` sets (None: the method has none).
        letter: what the experiment scripts call its stages: ``P`` (pruning), ``Q``
            (quantization), ``S`` (sharing), ``L`` (LoRA), ``J`` (joint), ``N`` (norms).
    """

    name: str
    callback: type[CompressionCallback]
    intensity: str | None
    letter: str

    @property
    def config(self) -> type[StageConfig]:
        """The method's frozen config class (its fields are what its identity is made of)."""
        return self.callback.config_class

    def parameters(self) -> set[str]:
        """Every argument the callback takes (see :func:`callback_parameters`)."""
        return callback_parameters(self.callback)

    def accepts(self, argument: str) -> bool:
        """Whether the method takes ``argument``."""
        return argument in self.parameters()

    def build(self, intensity: Any = None, **arguments: Any) -> CompressionCallback:
        """The callback with ``intensity`` and ``arguments`` (``name``, ``b_orig``, ...). A
        quantizer's intensity may be a grid format instead of bits (``"nvfp4"``: its
        ``format`` argument).

        Raises:
            PPQConfigError: an intensity for a method without one, or the method's own errors.
        """
        if isinstance(intensity, str) and self.accepts("format") and self.intensity == "bits":
            if "format" in arguments:
                raise PPQConfigError(
                    f"{self.name}: the format is given twice ({intensity!r} and "
                    f"format={arguments['format']!r}): give it once."
                )
            arguments["format"], intensity = intensity, None  # rtn:nvfp4, gptq:Q4_K_M
        if intensity is not None:
            if self.intensity is None:
                raise bad_value(f"{self.name} intensity", intensity, "none (the method has none)")
            if self.intensity in arguments:
                raise PPQConfigError(
                    f"{self.name}: its intensity {self.intensity} is given twice "
                    f"({intensity!r} and {self.intensity}={arguments[self.intensity]!r}): give it "
                    "once."
                )
            arguments[self.intensity] = intensity
        return self.callback(**arguments)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", MagnitudePruning, "sparsity", "P"),
        Method("wanda", Wanda, "sparsity", "P"),
        Method("sparsegpt", SparseGPT, "sparsity", "P"),
        Method("block_removal", BlockRemoval, "ratio", "P"),
        Method("channels", ChannelPruning, "ratio", "P"),
        Method("depgraph", DepGraphPruning, "ratio", "P"),
        Method("rtn", RTNQuantization, "bits", "Q"),
        Method("gptq", GPTQ, "bits", "Q"),
        Method("qat", QuantizationAwareTraining, "bits", "Q"),
        Method("codeq", DeadZoneQuantization, "bits", "Q"),
        Method("sqs", SQS, "bits", "Q"),
        Method("sharing", BasisSharing, "ratio", "S"),
        Method("lora", LoRAFineTune, "r", "L"),
        Method("joint", JointStructuralMixedPrecision, "budget", "J"),
        Method("bn", BatchNormRecalibration, None, "N"),
        Method("fold", FoldBatchNorm, None, "N"),
    )
}
"""Every method by short name, in one table (pruning, quantization, the rest)."""


def method_names(letters: str | None = None) -> list[str]:
    """The registered short names (of the methods whose letter is in ``letters``)."""
    return [n for n, m in METHODS.items() if letters is None or m.letter in letters]


def method(name: str, letters: str | None = None, argument: str = "method") -> Method:
    """The registered method called ``name`` (among those whose letter is in ``letters``).

    Raises:
        PPQConfigError: naming ``argument``, the value and every allowed name.
    """
    return METHODS[check_choice(argument, name, method_names(letters))]


def _value(text: str) -> Any:
    """A spec value: ``true``/``false``/``none``, an int, a float, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(
    spec: str, letters: str | None = None, argument: str = "method"
) -> tuple[Method, Any, dict[str, Any]]:
    """``(method, intensity, arguments)`` of ``METHOD[:INTENSITY][,ARGUMENT=VALUE...]``.

    Raises:
        PPQConfigError: naming the spec, on an unknown method (among ``letters``), an argument
            that is not ``name=value`` or that the method does not take.
    """
    head, *rest = spec.split(",")
    name, _, intensity = head.partition(":")
    found = method(name.strip(), letters, argument)
    arguments: dict[str, Any] = {}
    for item in rest:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise bad_value("spec", spec, "METHOD[:INTENSITY][,ARGUMENT=VALUE...]")
        if not found.accepts(key):
            allowed = sorted(found.parameters())
            raise PPQConfigError(
                f"spec {spec!r}: {found.name} has no argument {key!r}; its arguments are "
                f"{', '.join(allowed)}."
            )
        arguments[key] = _value(value)
    return found, _value(intensity) if intensity.strip() else None, arguments


def build_stage(
    spec: str,
    intensity: Any = None,
    *,
    letters: str | None = None,
    num_calibration_batches: int | None = None,
    argument: str = "method",
    **common: Any,
) -> CompressionCallback:
    """A stage from a spec, at ``intensity`` when the spec gives none, with ``common``
    arguments (``name``, ``b_orig``, ``log_layers``, ``targets``, ...);
    ``num_calibration_batches`` is given only to the methods that calibrate.

    Args:
        spec: ``METHOD[:INTENSITY][,ARGUMENT=VALUE...]`` (see the module's docstring).
        intensity: the method's intensity when the spec has none (``gptq`` with ``4``).
        letters: the kinds of method allowed (``"P"``: pruning only), for the error message.
        num_calibration_batches: calibration batches of the methods that take them.
        argument: what the error calls the spec (``"pruning"``, ``"quantization"``).
        **common: further arguments of the callback.

    Raises:
        PPQConfigError: see :func:`parse_spec`; an intensity in both the spec and
            ``intensity``; the method's own errors.
    """
    found, given, arguments = parse_spec(spec, letters, argument)
    if given is not None and intensity is not None:
        raise PPQConfigError(
            f"{argument}={spec!r} gives an intensity, and {intensity!r} is given too: give it once."
        )
    if num_calibration_batches is not None and found.accepts("num_calibration_batches"):
        arguments.setdefault("num_calibration_batches", num_calibration_batches)
    twice = sorted(set(common) & set(arguments))
    if twice:
        raise PPQConfigError(
            f"{argument}={spec!r} sets {twice[0]}, which is given too: give it once."
        )
    return found.build(given if given is not None else intensity, **common, **arguments)
