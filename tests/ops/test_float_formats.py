"""E2M1, E4M3 and E8M0 against hand-computed values: levels, codes, ties to even, subnormals,
saturation, shared exponents."""

import pytest
import torch

from ppq_lightning.ops.float_formats import (
    E2M1_MAGNITUDES,
    e2m1_code,
    e2m1_value,
    e2m1_values,
    e4m3_code,
    e4m3_value,
    e8m0_code,
    e8m0_value,
    floor_log2,
    mx_shared_exponent,
    round_to_e2m1,
    round_to_e4m3,
)

INF = float("inf")


def test_e2m1_levels_are_the_16_codes_of_the_mx_encoding():
    positive = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    values = e2m1_values()
    assert values.tolist() == positive + [-v for v in positive]
    assert torch.signbit(values[8])  # code 8 is -0
    assert torch.equal(e2m1_value(torch.arange(16)), values)
    assert torch.equal(e2m1_value(torch.arange(16, dtype=torch.uint8)), values)


@pytest.mark.parametrize(
    ("x", "code"),
    [
        (0.0, 0),
        (-0.0, 0),  # zero is always code 0, never -0's code 8
        (-0.1, 0),  # rounds to zero: code 0 too
        (0.25, 0),  # tie 0 | 0.5 -> even code 0
        (0.2501, 1),
        (0.75, 2),  # tie 0.5 | 1 -> even code 2 (1.0)
        (1.25, 2),  # tie 1 | 1.5 -> 1.0
        (1.75, 4),  # tie 1.5 | 2 -> 2.0
        (2.5, 4),  # tie 2 | 3 -> 2.0
        (2.6, 5),
        (3.5, 6),  # tie 3 | 4 -> 4.0
        (5.0, 6),  # tie 4 | 6 -> 4.0
        (5.01, 7),
        (6.0, 7),
        (1e9, 7),  # saturating
        (INF, 7),
        (-0.3, 9),
        (-2.6, 13),
        (-5.0, 14),
        (-7.0, 15),
        (-INF, 15),
    ],
)
def test_e2m1_code_of_hand_values(x, code):
    assert e2m1_code(torch.tensor([x])).tolist() == [code]
    assert e2m1_code(torch.tensor([x])).dtype == torch.uint8


def test_e2m1_rounding_is_the_nearest_level_by_brute_force():
    x = torch.cat(
        [torch.linspace(-8, 8, 64001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])]
    )
    rounded = round_to_e2m1(x)
    levels = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES[1:]))
    distance = (x[:, None] - levels[None, :]).abs().min(dim=1).values
    assert torch.equal((x - rounded).abs(), distance)  # always a nearest level
    assert torch.isfinite(rounded).all() and rounded.abs().max() == 6.0
    assert not torch.signbit(rounded[rounded == 0]).any()  # zero is +0.0


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (1.0, 1.0),
        (1.0625, 1.0),  # tie 1 | 1.125 -> even mantissa 000
        (1.1875, 1.25),  # tie 1.125 | 1.25 -> even mantissa 010
        (17.0, 16.0),  # tie 16 | 18 -> 16
        (19.0, 20.0),  # tie 18 | 20 -> 20
        (100.0, 96.0),  # tie 96 | 104 -> 96 (mantissa 100)
        (2.0**-6, 2.0**-6),  # smallest normal
        (2.0**-9, 2.0**-9),  # smallest subnormal
        (1.4 * 2.0**-9, 2.0**-9),
        (2.0**-10, 0.0),  # tie 0 | 2**-9 -> 0
        (3 * 2.0**-10, 2.0**-8),  # tie 1 | 2 (subnormal mantissas) -> 2 * 2**-9
        (5 * 2.0**-10, 2.0**-8),  # tie 2 | 3 -> 2 * 2**-9
        (2.0**-11, 0.0),
        (-(2.0**-11), 0.0),  # rounds to +0.0, not -0.0
        (448.0, 448.0),
        (460.0, 448.0),
        (464.0, 448.0),  # halfway to the next binade step: saturates, no NaN
        (1e6, 448.0),
        (-1e6, -448.0),
        (INF, 448.0),
        (-INF, -448.0),
    ],
)
def test_e4m3_rounding_of_hand_values(x, expected):
    rounded = round_to_e4m3(torch.tensor([x]))
    assert rounded.dtype == torch.float32
    assert rounded.item() == expected
    assert not torch.signbit(rounded).item() or expected < 0


def test_e4m3_codes_and_values_round_trip_over_every_finite_code():
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF, 0x80)])
    values = e4m3_value(codes)
    assert torch.isfinite(values).all() and values.abs().max() == 448.0
    assert torch.equal(e4m3_code(values).long(), codes)
    assert torch.equal(round_to_e4m3(values), values)
    assert e4m3_code(torch.tensor([1.0, -448.0, 2.0**-9, 0.0, -0.0])).tolist() == [
        0x38,
        0xFE,
        0x01,
        0,
        0,
    ]
    assert e4m3_code(torch.tensor([0.0])).dtype == torch.uint8


def test_e4m3_rounding_never_makes_nan_from_finite_values():
    x = torch.randn(10000) * torch.logspace(-12, 12, 10000)
    assert torch.isfinite(round_to_e4m3(x)).all()


@pytest.mark.parametrize(
    ("amax", "code"),
    [
        (6.0, 127),  # floor(log2 6) = 2, minus emax_elem 2: scale 2**0
        (4.0, 127),
        (7.99, 127),  # 7.99 / 1 saturates to 6: the spec's rule, not rounded up
        (8.0, 128),
        (1.0, 125),  # scale 2**-2
        (0.7, 124),  # floor(log2 0.7) = -1: scale 2**-3
        (float(torch.nextafter(torch.tensor(8.0), torch.tensor(0.0))), 127),  # log2 -> 3.0
        (0.0, 0),  # an all-zero block: the smallest scale
        (2.0**-130, 0),  # below the range: clamped
        (3e38, 252),  # floor(log2) = 127
    ],
)
def test_mx_shared_exponent_of_hand_values(amax, code):
    assert mx_shared_exponent(torch.tensor([amax])).tolist() == [code]


def test_floor_log2_is_exact_where_log2_rounds():
    below = torch.nextafter(torch.tensor([8.0, 1.0, 2.0**-130]), torch.tensor(0.0))
    assert floor_log2(below).tolist() == [2, -1, -131]
    assert torch.floor(torch.log2(below[:1])).item() == 3.0  # why frexp is used


def test_e8m0_values_and_codes():
    codes = torch.tensor([0, 1, 125, 127, 128, 254])
    values = e8m0_value(codes)
    assert values.tolist() == [2.0**-127, 2.0**-126, 0.25, 1.0, 2.0, 2.0**127]
    assert torch.equal(e8m0_code(values), codes)
