"""The one method table (callbacks/registry.py) and its spec grammar."""

import pytest

import ppq_lightning.callbacks as callbacks
from ppq_lightning.callbacks import (
    GPTQ,
    BasisSharing,
    CompressionCallback,
    MagnitudePruning,
    SparseGPT,
    Wanda,
)
from ppq_lightning.callbacks.registry import METHODS, build_stage, method_names, parse_spec
from ppq_lightning.errors import PPQConfigError


def test_every_method_of_the_package_is_registered_once():
    methods = {
        c
        for c in (getattr(callbacks, n) for n in callbacks.__all__)
        if isinstance(c, type)
        and issubclass(c, CompressionCallback)
        and c is not CompressionCallback
        and "default_name" in vars(c)
    }
    registered = [m.callback for m in METHODS.values()]
    assert set(registered) == methods and len(registered) == len(methods)
    for entry in METHODS.values():
        if entry.intensity is not None:
            assert entry.intensity in entry.parameters(), entry.name


@pytest.mark.parametrize(
    ("spec", "direct"),
    [
        ("gptq:4", GPTQ(bits=4, num_calibration_batches=8)),
        (
            "gptq:3,group_size=16,act_order=true",
            GPTQ(3, 16, act_order=True, num_calibration_batches=8),
        ),
        ("wanda:0.5,scope=layer", Wanda(0.5, scope="layer", num_calibration_batches=8)),
        ("sparsegpt,pattern=2:4", SparseGPT(pattern="2:4", num_calibration_batches=8)),
        ("magnitude:0.3", MagnitudePruning(0.3)),  # not a calibrated method: no batches
        (
            "sharing:0.8,group_size=2,whiten=true",
            BasisSharing(2, ratio=0.8, whiten=True, num_calibration_batches=8),
        ),
    ],
)
def test_a_spec_builds_the_stage_its_arguments_say(spec, direct):
    stage = build_stage(spec, num_calibration_batches=8)
    assert type(stage) is type(direct) and stage.identity == direct.identity


def test_an_intensity_comes_from_the_spec_or_the_caller_not_both():
    assert build_stage("rtn", 4).identity == build_stage("rtn:4").identity
    with pytest.raises(PPQConfigError, match="method='rtn:4' gives an intensity"):
        build_stage("rtn:4", 3)
    with pytest.raises(PPQConfigError, match="its intensity bits is given twice"):
        build_stage("gptq:4,bits=3")
    with pytest.raises(PPQConfigError, match="its intensity bits is given twice"):
        build_stage("gptq:4", bits=3)
    with pytest.raises(PPQConfigError, match="sets group_size, which is given too"):
        build_stage("rtn:4,group_size=32", group_size=64)
    with pytest.raises(PPQConfigError, match=r"fold intensity=0\.5"):
        build_stage("fold:0.5")


def test_bad_specs_name_the_spec_and_what_is_allowed():
    with pytest.raises(PPQConfigError, match="pruning='rtn' is not allowed: expected one of"):
        build_stage("rtn", 4, letters="P", argument="pruning")
    with pytest.raises(PPQConfigError, match="rtn has no argument 'damp'; its arguments are"):
        parse_spec("rtn:4,damp=0.1")
    with pytest.raises(PPQConfigError, match=r"METHOD\[:INTENSITY\]"):
        parse_spec("rtn:4,symmetric")
    with pytest.raises(PPQConfigError, match="bits=9 is not allowed"):
        build_stage("rtn:9")


def test_method_names_by_letter():
    assert method_names("Q")[:2] == ["rtn", "gptq"]
    assert "depgraph" in method_names("P") and "rtn" not in method_names("P")


def test_a_grid_format_is_a_quantizers_intensity():
    from ppq_lightning.callbacks import GPTQ, RTNQuantization

    assert build_stage("rtn:nvfp4").identity == RTNQuantization(format="nvfp4").identity
    assert build_stage("gptq", "Q4_K_M").identity == GPTQ(format="Q4_K_M").identity
    assert build_stage("rtn:Q4_0").identity == (
        RTNQuantization(bits=4, group_size=32, symmetric=True).identity
    )
    with pytest.raises(PPQConfigError, match="format is given twice"):
        build_stage("rtn:nvfp4,format=mxfp4")
