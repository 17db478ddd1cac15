"""The network wrappers of engine.models.precond (docs/method.md §2, §5; docs/teachers.md): EDMDenoiser,
ConsistencyFunction, FlowVelocity, MeanFlowModel and the released networks' clocks (DiscreteVPDenoiser for
DiT, SiTVelocity / SiTMeanFlowModel) around a stub raw network whose output the tests choose exactly."""

import pytest
import torch
from torch import nn

from engine.formulas.broadcast import expand_like
from engine.formulas.edm import edm_loss_weight, edm_precond_coeffs
from engine.models.precond import (ConsistencyFunction, DiscreteVPDenoiser, EDMDenoiser, FlowVelocity,
                                   MeanFlowModel, SiTMeanFlowModel, SiTVelocity, ddpm_log_sigmas, ddpm_timestep)

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


# --------------------------------------------------------------------------------------------------
# Released clocks: DiT's discrete VP steps, SiT's reversed time
# --------------------------------------------------------------------------------------------------
def test_ddpm_sigmas_and_timesteps_invert_each_other_and_clamp():
    log_sigmas = ddpm_log_sigmas()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphabar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(log_sigmas.exp() ** 2, (1 - alphabar) / alphabar)   # ᾱ = 1/(1 + σ²)
    assert 0.0099 < log_sigmas[0].exp() < 0.0101 and 156 < log_sigmas[-1].exp() < 158
    steps = torch.tensor([0, 1, 37, 500, 998, 999])
    torch.testing.assert_close(ddpm_timestep(log_sigmas.exp()[steps], log_sigmas), steps.double())
    halfway = ((log_sigmas[37] + log_sigmas[38]) / 2).exp()     # linear in ln σ between two steps
    torch.testing.assert_close(ddpm_timestep(halfway[None], log_sigmas), torch.tensor([37.5], dtype=torch.float64))
    assert ddpm_timestep(torch.tensor([0.002, 500.0]), log_sigmas).tolist() == [0.0, 999.0]


class StubEps(nn.Module):
    """ε̂(x_t; t) = a·x_t + b·t, with DiT's second (variance) half of junk that must be dropped."""

    learn_sigma = True

    def __init__(self, a=0.5, b=0.01):
        super().__init__()
        self.a, self.b, self.calls = a, b, []

    def forward(self, x, noise_label, class_labels=None):
        self.calls.append((x.clone(), noise_label.clone()))
        eps = self.a * x + self.b * expand_like(noise_label, x)
        return torch.cat([eps, torch.full_like(x, 1e9)], dim=1)


def test_discrete_vp_denoiser_feeds_the_vp_state_and_step_and_returns_x_minus_sigma_eps():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 80.0], dtype=torch.float64)
    stub = StubEps()
    d = DiscreteVPDenoiser(stub)(x, sigma)
    x_t, t = stub.calls[-1]
    s = expand_like(sigma, x)
    torch.testing.assert_close(x_t, x / (1 + s ** 2).sqrt())
    torch.testing.assert_close(t, ddpm_timestep(sigma, ddpm_log_sigmas()))
    torch.testing.assert_close(d, x - s * (0.5 * x_t + 0.01 * expand_like(t, x)))
    # the optimal ε-predictor of Gaussian data N(0, 1) makes the optimal denoiser x/(1 + σ²)
    eps_star = DiscreteVPDenoiser(StubEps(a=0.0, b=0.0))
    eps_star.net.forward = lambda y, t, class_labels=None: torch.cat(
        [expand_like((1 - 1 / (1 + sigma ** 2)).sqrt(), y) * y, y], 1)   # E[ε | x_t] = √(1 − ᾱ)·x_t
    torch.testing.assert_close(eps_star(x, sigma), x / (1 + s ** 2))


def test_sit_wrappers_flip_time_and_negate_the_velocity():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.5, 0.9])
    stub = Stub(a=2.0, b=1.0)
    torch.testing.assert_close(SiTVelocity(stub)(z, t), -(2.0 * z + expand_like(1 - t, z)))
    r = torch.tensor([0.0, 0.2, 0.4])
    u = SiTMeanFlowModel(StubR(a=1.0, b=1.0, c=3.0))(z, r, t)
    torch.testing.assert_close(u, -(z + expand_like(1 - t, z) + 3.0 * expand_like(1 - r, z)))
