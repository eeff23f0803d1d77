"""A convolution's statistics read off its padded input equal those of its unfolded rows."""

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from ppq_lightning.modules.views import conv_input, input_rows
from ppq_lightning.ops.conv_statistics import (
    accumulate_conv_act_norms,
    accumulate_conv_hessian,
    conv_patches,
)
from ppq_lightning.ops.hessian import accumulate_hessian
from ppq_lightning.ops.wanda import accumulate_act_norms

CONVS = {
    "3x3": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "3x3-stride2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "5x3-dilated": lambda: nn.Conv2d(4, 6, (5, 3), padding=(4, 1), dilation=2),
    "1x1": lambda: nn.Conv2d(4, 6, 1),
    "1x1-stride2": lambda: nn.Conv2d(4, 6, 1, stride=2),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
    "same-padding": lambda: Conv2dSame(4, 4, 5, stride=2, groups=4),
}


def _batches(n=3):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 9, 11, generator=generator) for _ in range(n)]


def _reference(conv, batches, accumulate, dtype=torch.float32):
    """The row accumulator over ``input_rows``, group by group."""
    per_group = []
    for j in range(conv.groups):
        acc, seen = None, 0
        for x in batches:
            rows = input_rows(conv, x)
            acc, seen = accumulate(acc, rows if conv.groups == 1 else rows[j], seen, dtype)
        per_group.append(acc)
    return (per_group[0] if conv.groups == 1 else torch.stack(per_group)), seen


def _direct(conv, batches, accumulate, dtype=torch.float32):
    acc, seen = None, 0
    for x in batches:
        acc, seen = accumulate(acc, *conv_input(conv, x), seen, dtype)
    return acc, seen


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize(
    ("direct", "rows"),
    [
        (accumulate_conv_hessian, accumulate_hessian),
        (accumulate_conv_act_norms, accumulate_act_norms),
    ],
    ids=["hessian", "act_norm"],
)
def test_equal_to_the_statistic_of_the_unfolded_rows(name, direct, rows):
    torch.manual_seed(0)
    conv = CONVS[name]()
    batches = _batches()
    expected, n_expected = _reference(conv, batches, rows)
    got, n = _direct(conv, batches, direct)
    assert n == n_expected == sum(conv(x)[:, 0].numel() for x in batches)  # all patches
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direct", [accumulate_conv_hessian, accumulate_conv_act_norms])
def test_summed_in_float64_when_asked(direct):
    conv = CONVS["grouped"]()
    got, _ = _direct(conv, _batches(), direct, torch.float64)
    rows = accumulate_hessian if direct is accumulate_conv_hessian else accumulate_act_norms
    expected, _ = _reference(conv, _batches(), rows, torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_patches_of_a_pointwise_conv_are_a_view_of_its_input():
    conv = CONVS["1x1"]()
    x = _batches(1)[0]
    padded, geometry = conv_input(conv, x)
    patches = conv_patches(padded, geometry)
    assert patches.shape == (2, 1, 4, 9 * 11)
    assert patches.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("name", list(CONVS))
def test_output_size_is_the_convolutions(name):
    conv = CONVS[name]()
    x = _batches(1)[0]
    padded, geometry = conv_input(conv, x)
    assert geometry.output_size(*padded.shape[2:]) == tuple(conv(x).shape[2:])


@pytest.mark.parametrize("name", list(CONVS))
def test_patches_equal_unfold_bit_for_bit(name):
    conv = CONVS[name]()
    x = _batches(1)[0]
    padded, geometry = conv_input(conv, x)
    patches = conv_patches(padded, geometry)
    expected = torch.nn.functional.unfold(
        padded, geometry.kernel_size, geometry.dilation, 0, geometry.stride
    )
    assert torch.equal(patches.flatten(1, 2), expected)


# -- 1-D and 3-D convolutions: the same windows over one or three spatial dimensions -----------
CONVS_ND = {
    "1d-k3": lambda: nn.Conv1d(4, 6, 3, padding=1),
    "1d-dilated-causal": lambda: nn.Conv1d(4, 6, 2, dilation=4, padding=4),  # WaveNet's layer
    "1d-stride2": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2),
    "1d-pointwise": lambda: nn.Conv1d(4, 6, 1),
    "1d-grouped": lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2),
    "1d-depthwise": lambda: nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=4),
    "3d": lambda: nn.Conv3d(4, 6, (3, 2, 3), padding=(1, 0, 1)),
    "3d-strided-grouped": lambda: nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1, groups=2),
}


def _batches_nd(conv, n=3):
    generator = torch.Generator().manual_seed(0)
    spatial = {1: (13,), 3: (5, 7, 6)}[len(conv.kernel_size)]
    return [torch.randn(2, 4, *spatial, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("name", list(CONVS_ND))
def test_nd_rows_times_the_weight_matrix_are_the_convolution(name):
    """Brute force: the convolution's output is its weight matrix times its input rows, group by
    group (so the rows' columns are in the weight's column order)."""
    torch.manual_seed(0)
    conv = CONVS_ND[name]()
    x = _batches_nd(conv, 1)[0]
    expected = conv(x) - conv.bias.view(-1, *[1] * len(conv.kernel_size))  # (B, out, *spatial)
    expected = expected.flatten(2).transpose(1, 2).flatten(0, 1)  # (B*L, out)
    rows = input_rows(conv, x)
    rows = rows[None] if conv.groups == 1 else rows  # (g, B*L, cols)
    w = conv.weight.flatten(1).unflatten(0, (conv.groups, -1))  # (g, out/g, cols)
    got = torch.cat([r @ wg.t() for r, wg in zip(rows, w, strict=True)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONVS_ND))
@pytest.mark.parametrize(
    ("direct", "rows"),
    [
        (accumulate_conv_hessian, accumulate_hessian),
        (accumulate_conv_act_norms, accumulate_act_norms),
    ],
    ids=["hessian", "act_norm"],
)
def test_nd_equal_to_the_statistic_of_the_unfolded_rows(name, direct, rows):
    conv = CONVS_ND[name]()
    batches = _batches_nd(conv)
    expected, n_expected = _reference(conv, batches, rows)
    got, n = _direct(conv, batches, direct)
    assert n == n_expected == sum(conv(x)[:, 0].numel() for x in batches)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in CONVS_ND if n.startswith("1d")])
def test_1d_patches_are_the_2d_unfold_of_a_height_one_kernel(name):
    conv = CONVS_ND[name]()
    x = _batches_nd(conv, 1)[0]
    padded, geometry = conv_input(conv, x)
    assert geometry.output_size(*padded.shape[2:]) == tuple(conv(x).shape[2:])
    expected = torch.nn.functional.unfold(
        padded[:, :, None],
        (1, *geometry.kernel_size),
        (1, *geometry.dilation),
        0,
        (1, *geometry.stride),
    )
    assert torch.equal(conv_patches(padded, geometry).flatten(1, 2), expected)
