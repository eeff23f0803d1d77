import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.views import (
    as_matrix,
    input_rows,
    is_compressible,
    matrix_to_layout,
    set_features,
    set_weight_matrix,
    to_weight_layout,
    weight_matrix,
)

LookAlikeConv1D = type("Conv1D", (nn.Module,), {})  # a class named Conv1D outside transformers


def _conv1d(nf: int = 6, nx: int = 5) -> Conv1D:
    torch.manual_seed(0)
    layer = Conv1D(nf, nx)  # weight (nx, nf) = (in, out)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


# -- is_compressible ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer",
    [nn.Linear(3, 2), nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3), nn.Conv3d(2, 3, 3), Conv1D(4, 3)],
)
def test_is_compressible_accepts_linear_convolutions_and_gpt2_conv1d(layer):
    assert is_compressible(layer)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Embedding(5, 3),
        nn.ConvTranspose1d(2, 3, 3),
        nn.ConvTranspose2d(2, 3, 3),
        nn.LayerNorm(4),
        nn.Sequential(),
        LookAlikeConv1D(),
    ],
)
def test_is_compressible_refuses_other_modules(layer):
    assert not is_compressible(layer)


# -- matrices -----------------------------------------------------------------------------------
def test_linear_weight_matrix_is_the_weight_itself():
    layer = nn.Linear(5, 3)
    matrix = weight_matrix(layer)
    assert matrix.shape == (3, 5) and torch.equal(matrix, layer.weight.data)
    assert torch.equal(as_matrix(layer, layer.weight.data), layer.weight.data)


def test_conv2d_weight_matrix_is_flattened_to_out_by_in_times_kernel():
    layer = nn.Conv2d(2, 4, (3, 2))
    matrix = weight_matrix(layer)
    assert matrix.shape == (4, 2 * 3 * 2)
    assert torch.equal(matrix, layer.weight.data.reshape(4, -1))


def test_gpt2_conv1d_weight_matrix_is_transposed():
    layer = _conv1d(nf=6, nx=5)
    matrix = weight_matrix(layer)
    assert matrix.shape == (6, 5) and torch.equal(matrix, layer.weight.data.t())
    x = torch.randn(3, 5)
    assert torch.allclose(layer(x), x @ matrix.t() + layer.bias)


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 3), lambda: nn.Conv2d(2, 4, 3), _conv1d])
def test_writing_into_the_weight_matrix_writes_the_weight(make):
    layer = make()
    weight_matrix(layer)[0, 1] = 123.0
    assert (layer.weight.data == 123.0).sum() == 1
    assert weight_matrix(layer)[0, 1] == 123.0


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 3), lambda: nn.Conv2d(2, 4, 3), _conv1d])
def test_to_weight_layout_inverts_as_matrix(make):
    layer = make()
    mask = torch.rand(layer.weight.shape) > 0.5
    matrix = as_matrix(layer, mask)
    assert matrix.shape == weight_matrix(layer).shape
    back = to_weight_layout(layer, matrix)
    assert back.shape == layer.weight.shape and torch.equal(back, mask)


def test_to_weight_layout_of_conv1d_transposes_the_matrix():
    layer = _conv1d(nf=6, nx=5)
    matrix = torch.arange(30.0).reshape(6, 5)
    assert torch.equal(to_weight_layout(layer, matrix), matrix.t())


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 3), lambda: nn.Conv2d(2, 4, 3), _conv1d])
def test_set_weight_matrix_writes_an_out_by_in_matrix(make):
    layer = make()
    matrix = torch.randn(weight_matrix(layer).shape)
    set_weight_matrix(layer, matrix)
    assert torch.equal(weight_matrix(layer), matrix)
    assert torch.equal(layer.weight.data, to_weight_layout(layer, matrix))


def test_set_weight_matrix_casts_to_the_weight_dtype():
    layer = nn.Linear(4, 3).half()
    matrix = torch.randn(3, 4, dtype=torch.float64)
    set_weight_matrix(layer, matrix)
    assert layer.weight.dtype == torch.float16
    assert torch.equal(layer.weight.data, matrix.half())


# -- layers whose shape changes -------------------------------------------------------------------
def test_matrix_to_layout_keeps_a_linear_matrix_and_makes_it_contiguous():
    matrix = torch.randn(4, 7).t()  # (7, 4), not contiguous
    out = matrix_to_layout(nn.Linear(5, 3), matrix)
    assert out.is_contiguous() and torch.equal(out, matrix)


def test_matrix_to_layout_transposes_for_conv1d():
    matrix = torch.randn(2, 5)  # any size: (out, in)
    out = matrix_to_layout(_conv1d(nf=6, nx=5), matrix)
    assert out.shape == (5, 2) and out.is_contiguous() and torch.equal(out, matrix.t())


def test_matrix_to_layout_refuses_a_conv2d():
    with pytest.raises(TypeError, match=r"nn\.Linear and GPT-2 Conv1D"):
        matrix_to_layout(nn.Conv2d(2, 4, 3), torch.randn(4, 18))


def test_set_features_follows_a_replaced_linear_weight():
    layer = nn.Linear(5, 3)
    layer.weight = nn.Parameter(torch.randn(2, 4))
    set_features(layer)
    assert (layer.out_features, layer.in_features) == (2, 4)


def test_set_features_follows_a_replaced_conv1d_weight():
    layer = _conv1d(nf=6, nx=5)
    layer.weight = nn.Parameter(torch.randn(4, 2))  # (in, out)
    set_features(layer)
    assert (layer.nf, layer.nx) == (2, 4)


# -- inputs as rows -------------------------------------------------------------------------------
def test_linear_input_rows_flatten_the_leading_dimensions():
    layer = nn.Linear(8, 3)
    x = torch.randn(2, 3, 8)
    rows = input_rows(layer, x)
    assert rows.shape == (6, 8) and torch.equal(rows, x.reshape(6, 8))
    assert torch.allclose(rows @ weight_matrix(layer).t() + layer.bias, layer(x).reshape(6, 3))


def test_conv1d_input_rows_flatten_the_leading_dimensions():
    layer = _conv1d(nf=6, nx=5)
    x = torch.randn(2, 4, 5)
    assert torch.equal(input_rows(layer, x), x.reshape(8, 5))


@pytest.mark.parametrize(
    "kwargs", [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": (1, 2)}]
)
def test_conv2d_input_rows_are_the_unfolded_patches(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), bias=False, **kwargs)
    x = torch.randn(2, 3, 7, 6)
    rows = input_rows(conv, x)
    out = conv(x)  # (B, O, H', W')
    b, o, h, w = out.shape
    assert rows.shape == (b * h * w, 3 * 3 * 2)
    expected = out.flatten(2).transpose(1, 2).reshape(b * h * w, o)  # (B*L, O)
    assert torch.allclose(rows @ weight_matrix(conv).t(), expected, atol=1e-5)


@pytest.mark.parametrize(("channels", "out", "groups"), [(4, 6, 2), (6, 6, 6), (6, 12, 6)])
def test_input_rows_of_a_grouped_conv2d_are_per_group_and_reproduce_it(channels, out, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, out, 3, padding=1, stride=2, groups=groups, bias=False)
    x = torch.randn(2, channels, 7, 7)
    rows = input_rows(conv, x)  # (groups, n, channels / groups * 9)
    assert rows.shape == (groups, 2 * 4 * 4, channels // groups * 9)
    w = weight_matrix(conv).reshape(groups, out // groups, -1)  # each group's weight rows
    y = torch.bmm(rows, w.mT).transpose(0, 1).reshape(rows.shape[1], out)  # (n, out)
    reference = conv(x).permute(0, 2, 3, 1).reshape(-1, out)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


def test_input_rows_refuses_a_conv2d_with_string_padding():
    conv = nn.Conv2d(4, 4, 3, padding="same")
    with pytest.raises(PPQConfigError, match=r"padding='same'"):
        input_rows(conv, torch.randn(1, 4, 5, 5))


def test_input_rows_pads_timm_same_convolutions_as_their_forward():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(3, 5, 3, stride=2, bias=False)
    x = torch.randn(2, 3, 9, 9)
    y = input_rows(conv, x) @ weight_matrix(conv).T
    torch.testing.assert_close(y, conv(x).permute(0, 2, 3, 1).reshape(-1, 5), rtol=1e-5, atol=1e-5)
