import pytest
import torch

from ppq_lightning.ops.dead_zone import (
    DeadZoneQuantizer,
    dead_zone_grid,
    dead_zone_quantize,
    keep_rates,
    learned_bits,
)


def weights() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    w[2] = 0.0  # an all-zero row
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dead_zone_is_exactly_zero_and_the_rest_on_the_grid(bits):
    w, theta = weights(), torch.tensor(-1.0)
    q = dead_zone_quantize(w, theta, bits, temperature=0.05)
    for i in range(w.shape[0]):  # brute force, element by element
        m = w[i].abs().max().item() or 1.0
        step, d = m / (2 ** (bits - 1) - 1), torch.sigmoid(theta).item() * m
        for j in range(w.shape[1]):
            x = w[i, j].item()
            expected = 0.0 if abs(x) <= d else step * round(x / step)
            assert q[i, j].item() == pytest.approx(expected, abs=1e-6)
    inside = w.abs() <= torch.sigmoid(theta) * w.abs().amax(1, keepdim=True)
    assert inside.any() and (q[inside] == 0).all()  # exact zeros
    grid = dead_zone_grid(w, bits)
    assert grid.symmetric and grid.bits == bits and grid.scale.shape == (6, 1)
    assert torch.equal(grid.fake_quantize(q), q)  # every value is a grid point, exactly
    assert (grid.quantize(q) >= 1).all()  # codes within the symmetric range [-(2^(b-1)-1), ..]


def test_surrogate_gradient_reaches_theta_and_weights():
    w = weights().requires_grad_(True)
    theta = torch.tensor(-0.8, requires_grad=True)  # d ~ 0.31 max|w|: beyond half a 4-bit step
    q = dead_zone_quantize(w, theta, 4, temperature=0.05)
    (q * torch.randn_like(q)).sum().backward()
    assert theta.grad is not None and theta.grad != 0
    assert w.grad.abs().sum() > 0
    # a wider dead zone keeps fewer weights: the soft keep rate falls with theta
    soft, hard = keep_rates(weights(), theta, 4, 0.05)
    theta.grad = None
    soft.backward()
    assert theta.grad < 0
    assert 0 < hard < 1


def test_learned_bits_clamp_to_2_8_and_round_with_identity_gradient():
    beta = torch.tensor([0.5, 1.9, 3.4, 3.6, 7.7, 11.0], requires_grad=True)
    bits = learned_bits(beta)
    assert bits.tolist() == [2.0, 2.0, 3.0, 4.0, 8.0, 8.0]
    bits.sum().backward()
    assert beta.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # clamped ends: no gradient


def test_learned_bits_change_the_step_and_get_a_gradient():
    w = weights()
    quantizer = DeadZoneQuantizer(bits=4, init_dead_zone=None, temperature=0.05, learn_bits=True)
    assert quantizer.integer_bits() == 4
    assert quantizer.dead_zone() == pytest.approx(0.5 / 7)  # half a step: plain rounding
    q = quantizer(w)
    torch.testing.assert_close(q, dead_zone_grid(w, 4).fake_quantize(w))
    (q - w).pow(2).sum().backward()
    assert quantizer.bit_width.grad != 0  # through the step s = m / (2^(b-1) - 1)
    with torch.no_grad():
        quantizer.bit_width.fill_(12.0)
    quantizer.project()
    assert quantizer.bit_width.item() == 8.0 and quantizer.integer_bits() == 8
