import pytest
import torch

from ppq_lightning import compression_summary
from ppq_lightning.callbacks import GPTQ, RTNQuantization
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.mixed_precision import (
    assign_bits,
    check_layer_bits,
    check_promote,
    sensitivity,
)
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.ops.grid_formats import GridSpec


def test_layer_bits_by_regex_first_match_wins(tiny_lm):
    modules = resolve_targets(tiny_lm)
    widths = assign_bits(modules, 4, {r"down_proj": 8, r"mlp\.": 3})
    for name, bits in widths.items():
        expected = 8 if "down_proj" in name else 3 if ".mlp." in name else 4
        assert bits == expected, name


def test_promote_gives_the_most_sensitive_fraction_more_bits(tiny_lm):
    modules = resolve_targets(tiny_lm)
    widths = assign_bits(modules, 2, promote={"bits": 8, "fraction": 0.3})
    promoted = [n for n, b in widths.items() if b == 8]
    numel = {n: m.weight.numel() for n, m in modules.items()}
    assert sum(numel[n] for n in promoted) >= 0.3 * sum(numel.values())
    score = {n: sensitivity(m, GridSpec.of("int", 2)) for n, m in modules.items()}
    # every promoted layer is at least as sensitive as every layer left at 2 bits
    assert min(score[n] for n in promoted) >= max(score[n] for n in widths if n not in promoted)


def test_rtn_mixed_precision_records_each_width_and_reports_average_bits(tiny_lm):
    stage = RTNQuantization(bits=4, layer_bits={"down_proj": 8, "q_proj": 16})
    stage.apply(tiny_lm)
    modules = resolve_targets(tiny_lm)
    numel = {n: m.weight.numel() for n, m in modules.items()}
    for name, module in modules.items():
        state = get_state(module)
        if "q_proj" in name:
            assert state is None  # 16 = left unquantized
        else:
            assert state.bits == (8 if "down_proj" in name else 4)
    expected = sum(
        numel[n] * (8 if "down_proj" in n else 16 if "q_proj" in n else 4) for n in numel
    ) / sum(numel.values())
    assert compression_summary(tiny_lm).avg_bits == pytest.approx(expected)
    assert stage.result.summary.nominal_C == pytest.approx(16 / expected)


def test_a_progression_of_stages_on_layer_subsets(tiny_lm):
    """Q8>Q4: every layer at 8 bits, then the MLP re-quantized at 4 (the grid is replaced)."""
    RTNQuantization(bits=8, name="Q8").apply(tiny_lm)
    RTNQuantization(bits=16, layer_bits={r"mlp\.": 4}, name="Q4").apply(tiny_lm)
    for name, module in resolve_targets(tiny_lm).items():
        assert get_state(module).bits == (4 if ".mlp." in name else 8)


def test_gptq_mixed_precision(tiny_lm, tiny_data):
    GPTQ(bits=3, layer_bits={"down_proj": 8}, num_calibration_batches=2).apply(
        tiny_lm, dataloader=tiny_data.calibration_dataloader()
    )
    for name, module in resolve_targets(tiny_lm).items():
        assert get_state(module).bits == (8 if "down_proj" in name else 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_layer_bits({"down": 9}), r"layer_bits\['down'\]=9"),
        (lambda: check_layer_bits({"(": 4}), "valid regular expression"),
        (lambda: check_layer_bits([4]), "layer_bits"),
        (lambda: check_promote({"bits": 8}), "promote"),
        (lambda: check_promote({"bits": 8, "fraction": 0}), r"promote\.fraction=0"),
        (lambda: check_promote({"bits": 1, "fraction": 0.5}), r"promote\.bits=1"),
        # "int" names no grid alone (its bits do): named as the layer's value, not as bits=None
        (
            lambda: check_layer_bits({"down": "int"}),
            r"layer_bits\['down'\]='int' .*bits from 2 to 8, or 16 \(off\), or a format: "
            r"one of nvfp4",
        ),
        (lambda: check_promote({"bits": "INT", "fraction": 0.5}), r"promote\.bits='INT'"),
        (lambda: check_layer_bits({"down": "fp9"}), r"layer_bits\['down'\]='fp9' .*bits from"),
    ],
)
def test_bad_mixed_precision_arguments(call, message):
    with pytest.raises(PPQConfigError, match=message):
        call()


def test_a_layer_bits_regex_that_matches_nothing_is_an_error(tiny_lm):
    before = {n: p.clone() for n, p in tiny_lm.named_parameters()}
    with pytest.raises(PPQConfigError, match="'gate_prj' matches none"):
        RTNQuantization(bits=4, layer_bits={"gate_prj": 8}).apply(tiny_lm)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.named_parameters())
