import math

import pytest
import torch

from ppq_lightning.ops.sqs import (
    SQSPosterior,
    inclusion_kl,
    most_likely_codes,
    slab_kl,
    soft_levels,
    sqs_grid,
    window_codes,
)


def _w():
    torch.manual_seed(0)
    return torch.randn(4, 16)


def test_window_covers_the_three_nearest_levels_inside_the_grid():
    w, scale = torch.tensor([[0.0, 0.26, 1.0]]), torch.tensor([[0.25]])
    codes = window_codes(w, scale, bits=3)  # levels -3..3
    assert codes.permute(1, 2, 0).tolist() == [[[-1, 0, 1], [0, 1, 2], [2, 3, 3]]]


def test_soft_levels_sharpen_to_the_most_likely_level_as_the_temperature_falls():
    w = _w()
    posterior = SQSPosterior(w, 4, 0.9, 0.5)
    hard = most_likely_codes(w, posterior.scale, posterior.log_phi(), 0.5, 4) * posterior.scale
    cold = soft_levels(w, posterior.scale, posterior.log_phi(), 0.5, 4, temperature=1e-3)
    warm = soft_levels(w, posterior.scale, posterior.log_phi(), 0.5, 4, temperature=1.0)
    torch.testing.assert_close(cold, hard, rtol=0, atol=1e-3)  # a weight near a midpoint
    assert (warm - hard).abs().max() > 1e-3
    # with uniform mixture weights the most likely level is the nearest one
    torch.testing.assert_close(hard, torch.round(w / posterior.scale) * posterior.scale)


def test_collapse_gives_exact_zeros_and_grid_values():
    w = _w()
    posterior = SQSPosterior(w, 3, 0.9, 0.5)
    with torch.no_grad():
        posterior.inclusion_raw[:, :8] = -1.0
    q, keep = posterior.collapse(w)
    assert not keep[:, :8].any() and keep[:, 8:].all()
    assert (q[:, :8] == 0).all()
    grid = sqs_grid(posterior.scale, 3)
    torch.testing.assert_close(grid.fake_quantize(q), q)  # on the grid exactly


def test_inclusion_kl_is_zero_at_the_prior_and_positive_elsewhere():
    logit = torch.full((3, 3), math.log(0.3 / 0.7))
    assert abs(float(inclusion_kl(logit, 0.3))) < 1e-5
    assert float(inclusion_kl(logit + 2, 0.3)) > 0


def test_slab_kl_is_lowest_on_the_grid_levels_and_costs_about_the_code_length():
    scale = torch.tensor([[0.5]])
    on, off = torch.tensor([[1.0]]), torch.tensor([[1.25]])
    assert float(slab_kl(on, scale, 0.3, 0.3, 4)) < float(slab_kl(off, scale, 0.3, 0.3, 4))
    assert float(slab_kl(on, scale, 0.3, 0.3, 4)) == pytest.approx(math.log(15) - 0.5, abs=1e-2)
    level = torch.tensor([[0.5]])  # on the grid of 2 bits (levels -1..1) and of 4
    assert float(slab_kl(level, scale, 0.3, 0.3, 2)) < float(slab_kl(level, scale, 0.3, 0.3, 4))
