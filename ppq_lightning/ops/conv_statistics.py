"""Calibration statistics of a convolution straight from its (padded) input, without building
the ``(n, C * kh * kw)`` patch matrix.

A convolution is a linear layer over the patches its kernel sees, so its Hessian is
``2 P^T P / N`` and its Wanda statistic the mean of each patch entry squared, over the
``N = batch * out_h * out_w`` patches. Materialising ``P`` row by row (unfold, transpose,
flatten) costs two copies of ``kh * kw`` times the input; here:

- the mean squared patch entries are read off the batch sum of ``x^2``, one strided window per
  kernel offset (no patch matrix at all);
- the Hessian sums ``P_b P_b^T`` image by image on unfold's own layout ``(C * kh * kw, L)``
  (no transposed copy), and a 1x1 convolution with stride 1 is the input itself, unfolded by a
  view.

Column order is the weight matrix's (``weight.flatten(1)``): channel, then kernel row, then
kernel column; a grouped convolution gets one statistic per group, ``(groups, cols[, cols])``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ConvGeometry(NamedTuple):
    """What a convolution does to an input that is already padded: kernel size, stride,
    dilation (pairs) and groups."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output height and width over a padded input of that size."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1


def conv_patches(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The patches of a padded input ``(B, C, H, W)`` as ``(B, groups, cols, L)``.

    ``cols = C / groups * kh * kw`` in the weight's column order and ``L`` the output positions;
    a view of ``x`` for a 1x1 kernel with stride 1, unfold's output otherwise.
    """
    if geometry.kernel_size == (1, 1) and geometry.stride == (1, 1):
        return x.flatten(2).unflatten(1, (geometry.groups, -1))  # (B, g, C/g, H*W): a view
    # unfold's layout, built from one strided window per kernel offset (equal to F.unfold bit
    # for bit, and ~1.6x faster on CPU)
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.dilation
    out_h, out_w = geometry.output_size(*x.shape[2:])
    windows = [
        x[
            :,
            :,
            i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
            j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
        ]
        for i in range(kh)
        for j in range(kw)
    ]  # kh * kw of (B, C, out_h, out_w)
    patches = torch.stack(windows, 2)  # (B, C, kh * kw, out_h, out_w)
    return patches.reshape(x.shape[0], geometry.groups, -1, out_h * out_w)


def _squeeze_groups(stat: Tensor, geometry: ConvGeometry) -> Tensor:
    return stat[0] if geometry.groups == 1 else stat


def accumulate_conv_hessian(
    h: Tensor | None,
    x: Tensor,
    geometry: ConvGeometry,
    n_seen: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Running ``2 P^T P / N`` of a convolution over its padded input ``x``; returns
    ``(H, N)`` with ``H`` ``(cols, cols)``, or ``(groups, cols, cols)`` for a grouped one.

    Equal, up to float summation order, to ``accumulate_hessian`` over the unfolded rows.
    ``h`` is updated in place; ``dtype`` as there (each image's patches are cast on their own).
    """
    patches = conv_patches(x, geometry)  # (B, g, cols, L)
    batch, groups, cols, positions = patches.shape
    n_new = n_seen + batch * positions
    if h is None:
        h = torch.zeros(groups, cols, cols, device=x.device, dtype=dtype)
    elif geometry.groups == 1:
        h = h[None]
    h.mul_(n_seen / n_new)
    for image in patches:  # (g, cols, L)
        p = image.to(dtype)
        h.baddbmm_(p, p.mT, alpha=2.0 / n_new)
    return _squeeze_groups(h, geometry), n_new


def accumulate_conv_act_norms(
    acc: Tensor | None,
    x: Tensor,
    geometry: ConvGeometry,
    n_seen: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Running mean of each patch entry squared of a convolution over its padded input ``x``;
    returns ``(norms, N)`` with ``norms`` ``(cols,)``, or ``(groups, cols)`` when grouped.

    Equal, up to float summation order, to ``accumulate_act_norms`` over the unfolded rows.
    """
    batch = x.shape[0]
    squares = x.to(dtype).pow(2).sum(0)  # (C, H, W)
    out_h, out_w = geometry.output_size(*squares.shape[1:])
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.dilation
    offsets = [
        squares[
            :,
            i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
            j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
        ].sum((1, 2))
        for i in range(kh)
        for j in range(kw)
    ]  # kh * kw of (C,)
    total = torch.stack(offsets, 1).reshape(geometry.groups, -1)  # (g, C / g * kh * kw)
    n_new = n_seen + batch * out_h * out_w
    total = total / n_new
    if acc is not None:
        acc = acc if geometry.groups > 1 else acc[None]
        total = acc * (n_seen / n_new) + total
    return _squeeze_groups(total, geometry), n_new
