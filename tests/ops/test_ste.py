import torch

from ppq_lightning.ops.quant_grid import compute_grid
from ppq_lightning.ops.ste import fake_quantize_ste, round_ste, straight_through


def test_round_ste_rounds_forward_and_passes_the_gradient():
    x = torch.tensor([-1.5, -0.4, 0.6, 2.5, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))  # exactly, no rounding error added
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0))


def test_straight_through_is_hard_forward_soft_backward():
    x = torch.tensor([0.3, 0.7], requires_grad=True)
    hard, soft = (x > 0.5).float(), torch.sigmoid(x)
    y = straight_through(hard, soft)
    assert torch.equal(y, torch.tensor([0.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x) * (1 - torch.sigmoid(x)))


def test_fake_quantize_ste_lands_on_the_grid_with_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(4, 8, requires_grad=True)
    grid = compute_grid(w, 3)
    q = fake_quantize_ste(w, grid)
    assert torch.equal(q, grid.fake_quantize(w))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
