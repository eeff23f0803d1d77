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
The same code serves 1-D and 3-D convolutions (``nn.Conv1d``: one kernel dimension, ``kh * kw``
above is its kernel size; ``nn.Conv3d``: three): :class:`ConvGeometry` has one entry per spatial
dimension and the windows walk them all.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor


class ConvGeometry(NamedTuple):
    """What a convolution does to an input that is already padded: kernel size, stride and
    dilation (one entry per spatial dimension: 1 for ``Conv1d``, 2 for ``Conv2d``, 3 for
    ``Conv3d``) and groups."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def output_size(self, *spatial: int) -> tuple[int, ...]:
        """Output size over a padded input of that spatial size (``height, width`` for a 2-D
        convolution)."""
        return tuple(
            (size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(
                spatial, self.kernel_size, self.stride, self.dilation, strict=True
            )
        )

    def windows(self, x: Tensor) -> list[Tensor]:
        """One strided view of ``x`` (``(..., *spatial)``, already padded) per kernel offset,
        in the weight's column order (the last kernel dimension fastest), each of the output's
        spatial size."""
        out = self.output_size(*x.shape[x.dim() - len(self.kernel_size) :])
        lead = (slice(None),) * (x.dim() - len(self.kernel_size))
        return [
            x[
                lead
                + tuple(
                    slice(i * d, i * d + (n - 1) * s + 1, s)
                    for i, d, n, s in zip(offset, self.dilation, out, self.stride, strict=True)
                )
            ]
            for offset in itertools.product(*(range(k) for k in self.kernel_size))
        ]


def conv_patches(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The patches of a padded input ``(B, C, *spatial)`` as ``(B, groups, cols, L)``.

    ``cols = C / groups * prod(kernel_size)`` in the weight's column order and ``L`` the output
    positions; a view of ``x`` for a pointwise kernel with stride 1. For a 2-D convolution this
    is ``F.unfold``'s output bit for bit (built from one strided window per kernel offset, ~1.6x
    faster on CPU); a 1-D or 3-D one goes through the same windows.
    """
    if all(k == 1 for k in geometry.kernel_size) and all(s == 1 for s in geometry.stride):
        return x.flatten(2).unflatten(1, (geometry.groups, -1))  # (B, g, C/g, L): a view
    windows = geometry.windows(x)  # prod(kernel) of (B, C, *out)
    patches = torch.stack(windows, 2)  # (B, C, prod(kernel), *out)
    return patches.reshape(x.shape[0], geometry.groups, -1, windows[0][0, 0].numel())


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
    squares = x.to(dtype).pow(2).sum(0)  # (C, *spatial)
    dims = tuple(range(1, squares.dim()))
    windows = geometry.windows(squares)  # prod(kernel) of (C, *out)
    offsets = [window.sum(dims) for window in windows]  # prod(kernel) of (C,)
    total = torch.stack(offsets, 1).reshape(geometry.groups, -1)  # (g, C / g * prod(kernel))
    n_new = n_seen + batch * windows[0][0].numel()
    total = total / n_new
    if acc is not None:
        acc = acc if geometry.groups > 1 else acc[None]
        total = acc * (n_seen / n_new) + total
    return _squeeze_groups(total, geometry), n_new
