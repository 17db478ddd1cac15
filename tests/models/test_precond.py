"""The network wrappers of engine.models.precond (docs/method.md §2, §5): EDMDenoiser, ConsistencyFunction,
FlowVelocity and MeanFlowModel around a stub raw network whose output the tests choose exactly."""

import pytest
import torch
from torch import nn

from engine.formulas.broadcast import expand_like
from engine.formulas.edm import edm_loss_weight, edm_precond_coeffs
from engine.models.precond import ConsistencyFunction, EDMDenoiser, FlowVelocity, MeanFlowModel

SD = 0.5


class Stub(nn.Module):
    """F(y; c) = a·y + b·c: lets tests pick the raw network exactly."""

    def __init__(self, a=1.0, b=0.0):
        super().__init__()
        self.a, self.b = a, b
        self.calls = []

    def forward(self, y, noise_label, class_labels=None):
        self.calls.append((y.clone(), noise_label.clone()))
        return self.a * y + self.b * expand_like(noise_label, y)


def test_consistency_function_is_identity_at_sigma_min_for_any_net():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    f = ConsistencyFunction(Stub(a=1e6, b=-3e5), SD, 0.002)
    assert torch.equal(f(x, torch.full((4,), 0.002)), x)
    assert torch.equal(f(x, 0.002), x)
    assert not torch.allclose(f(x, 0.5), x)


def test_edm_denoiser_matches_formula():
    x = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]])
    sigma = torch.tensor([0.5, 2.0])
    stub = Stub(a=2.0, b=1.0)
    d = EDMDenoiser(stub, SD)(x, sigma)
    c_skip, c_out, c_in, c_noise = [expand_like(c, x) for c in edm_precond_coeffs(sigma, SD)]
    torch.testing.assert_close(d, c_skip * x + c_out * (2.0 * c_in * x + c_noise))
    # the raw net sees c_in·x and c_noise = ln σ / 4
    y, label = stub.calls[-1]
    torch.testing.assert_close(y, c_in * x)
    torch.testing.assert_close(label, sigma.log() / 4)
    # σ=0.5 by hand for the first sample: c_skip=.5, c_out=c_in/4=.353553, c_noise=-.173287
    torch.testing.assert_close(d[0, 0, 0], torch.tensor([0.5 + 0.353553 * (2 * 1.414214 - 0.173287),
                                                         -1.0 + 0.353553 * (-4 * 1.414214 - 0.173287)]),
                               rtol=1e-5, atol=1e-5)


def test_wrappers_share_the_raw_net():
    stub = Stub()
    assert EDMDenoiser(stub).net is stub and ConsistencyFunction(EDMDenoiser(stub).net).net is stub
    assert FlowVelocity(stub).net is stub


def test_unit_weighted_loss_at_gaussian_optimum():
    """Data N(0, σd²): the optimal denoiser is c_skip·x (F ≡ 0) and λ·E‖D*−x0‖² = 1 at every σ."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    den = EDMDenoiser(Stub(a=0.0), SD)
    for s in (0.01, 0.3, 1.0, 10.0):
        x0 = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64) * SD
        x = x0 + s * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
        sigma = torch.full((n,), s, dtype=torch.float64)
        loss = (edm_loss_weight(sigma, SD) * ((den(x, sigma) - x0) ** 2).flatten()).mean()
        assert abs(loss.item() - 1) < 0.02, (s, loss.item())


@pytest.mark.parametrize("s", [0.1, 1.0, 5.0])
def test_edm_loss_minimised_by_gaussian_denoiser(s):
    """Data N(0, 1) ≠ σd: F* = (D* − c_skip·x)/c_out with D* = x/(1+σ²) minimises the EDM loss."""
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    x = x0 + s * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    sigma = torch.full((n,), s, dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_precond_coeffs(sigma[:1], SD)
    k_star = ((1 / (1 + s ** 2) - c_skip) / (c_out * c_in)).item()  # F*(c_in·x) = k*·c_in·x
    losses = []
    for k in (0.8 * k_star - 0.05, k_star, 1.2 * k_star + 0.05):
        d = EDMDenoiser(Stub(a=k), SD)(x, sigma)
        losses.append((edm_loss_weight(sigma, SD) * ((d - x0) ** 2).flatten()).mean().item())
    assert losses[1] < losses[0] and losses[1] < losses[2], losses


def test_flow_velocity_passes_t_unscaled_per_sample():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    stub = Stub(a=2.0, b=1.0)
    v = FlowVelocity(stub)(z, 0.3)
    torch.testing.assert_close(v, 2.0 * z + 0.3)
    y, label = stub.calls[-1]
    assert torch.equal(y, z) and label.shape == (3,) and torch.allclose(label, torch.full((3,), 0.3))
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(FlowVelocity(stub)(z, t), 2.0 * z + expand_like(t, z))


class StubR(nn.Module):
    """u(z; t, r) = a·z + b·t + c·r, built "with use_r" like the networks MeanFlow needs."""

    use_r = True

    def __init__(self, a=1.0, b=0.0, c=0.0):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, z, noise_label, r_label=None, class_labels=None):
        return self.a * z + self.b * expand_like(noise_label, z) + self.c * expand_like(r_label, z)


def test_meanflow_model_embeds_t_and_r_and_needs_use_r():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    r, t = torch.tensor([0.0, 0.2, 0.5]), torch.tensor([0.4, 0.9, 0.5])
    net = StubR(a=0.5, b=2.0, c=-3.0)
    u = MeanFlowModel(net)
    assert u.net is net
    torch.testing.assert_close(u(z, r, t), 0.5 * z + 2.0 * expand_like(t, z) - 3.0 * expand_like(r, z))
    torch.testing.assert_close(u(z, 0.25, 0.75), 0.5 * z + 2.0 * 0.75 - 3.0 * 0.25)   # scalar times broadcast
    with pytest.raises(ValueError, match="use_r=True"):
        MeanFlowModel(Stub())
