"""EDM preconditioning (SPEC §2) and flow-matching / MeanFlow relations (SPEC §5)."""

import math

import pytest
import torch
from torch import nn

from engine.edm import (consistency_precond_coeffs, edm_loss_weight, edm_precond_coeffs, pf_ode_drift,
                        sample_edm_sigma)
from engine.flow import (denoised_to_velocity, expand_like, fm_interpolate, fm_time_to_sigma, fm_velocity_target,
                         meanflow_step, sample_logit_normal, sample_meanflow_times, sigma_to_fm_time,
                         velocity_to_denoised)
from engine.networks.precond import ConsistencyFunction, EDMDenoiser, FlowVelocity

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


# ---------------------------------------------------------------- EDM coefficients

def test_edm_coeffs_hand_numbers():
    c_skip, c_out, c_in, c_noise = edm_precond_coeffs(torch.tensor([0.5, 2.0], dtype=torch.float64), SD)
    # σ = 0.5: σ²+σd² = 0.5;  σ = 2: 4.25
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4], dtype=torch.float64))


def test_edm_coeff_identities():
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 50, dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_precond_coeffs(sigma, SD)
    # unit-variance input for data of std σd, and unit-variance effective target of F
    torch.testing.assert_close(c_in ** 2 * (SD ** 2 + sigma ** 2), torch.ones_like(sigma))
    torch.testing.assert_close(c_skip ** 2 * sigma ** 2 + (1 - c_skip) ** 2 * SD ** 2, c_out ** 2)
    torch.testing.assert_close(edm_loss_weight(sigma, SD), 1 / c_out ** 2)


def test_consistency_coeffs_boundary_and_limit():
    smin = 0.002
    c_skip, c_out, c_in, c_noise = consistency_precond_coeffs(torch.tensor([smin]), SD, smin)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    e = edm_precond_coeffs(torch.tensor([smin]), SD)
    assert c_in.item() == e[2].item() and c_noise.item() == e[3].item()
    big = torch.tensor([80.0], dtype=torch.float64)
    for a, b in zip(consistency_precond_coeffs(big, SD, smin), edm_precond_coeffs(big, SD)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


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


def test_sample_edm_sigma_moments():
    g = torch.Generator().manual_seed(0)
    s = sample_edm_sigma(100_000, generator=g)
    assert s.shape == (100_000,) and (s > 0).all()
    assert abs(s.log().mean().item() + 1.2) < 0.02
    assert abs(s.log().std().item() - 1.2) < 0.02
    s2 = sample_edm_sigma(1000, P_mean=0.5, P_std=0.1, generator=torch.Generator().manual_seed(0))
    assert abs(s2.log().mean().item() - 0.5) < 0.02
    torch.testing.assert_close(sample_edm_sigma(8, generator=torch.Generator().manual_seed(3)),
                               sample_edm_sigma(8, generator=torch.Generator().manual_seed(3)))


def test_pf_ode_drift():
    """For N(0, s²) data the exact D gives the drift of x(σ) = x(0)·√(s²+σ²)/s, per-sample σ."""
    s = 0.7
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 20.0], dtype=torch.float64)
    sb = sigma[:, None, None, None]
    drift = pf_ode_drift(x, s ** 2 / (s ** 2 + sb ** 2) * x, sigma)
    torch.testing.assert_close(drift, sb / (s ** 2 + sb ** 2) * x)


# ---------------------------------------------------------------- flow matching / MeanFlow

def test_fm_interpolate_endpoints_and_velocity():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(fm_interpolate(x, eps, torch.zeros(3)), x)
    assert torch.equal(fm_interpolate(x, eps, torch.ones(3)), eps)
    t = torch.tensor([0.1, 0.5, 0.9])
    z = fm_interpolate(x, eps, t)
    torch.testing.assert_close(z[1], 0.5 * (x[1] + eps[1]))
    _, dz = torch.func.jvp(lambda tt: fm_interpolate(x, eps, tt), (t,), (torch.ones(3),))
    torch.testing.assert_close(dz, fm_velocity_target(x, eps))


def test_meanflow_step_and_conversions():
    x, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8, 1.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    v = fm_velocity_target(x, eps)
    z_t = fm_interpolate(x, eps, t)
    # the straight path has constant velocity, so its average velocity on [r, t] is v itself
    torch.testing.assert_close(meanflow_step(z_t, v, r, t), fm_interpolate(x, eps, r))
    assert torch.equal(meanflow_step(z_t, v, t, t), z_t)
    torch.testing.assert_close(velocity_to_denoised(z_t, v, t), x)
    tt, zz = t[:2], z_t[:2]  # t > 0 and t < 1 below
    torch.testing.assert_close(denoised_to_velocity(zz, x[:2], tt), v[:2])
    sigma = fm_time_to_sigma(tt)
    torch.testing.assert_close(sigma_to_fm_time(sigma), tt)
    torch.testing.assert_close(zz / (1 - expand_like(tt, zz)), x[:2] + expand_like(sigma, zz) * eps[:2])


def test_expand_like_errors():
    x = torch.zeros(3, 1, 2, 2)
    assert expand_like(torch.ones(3), x).shape == (3, 1, 1, 1)
    assert expand_like(0.5, x).ndim == 0
    with pytest.raises(ValueError):
        expand_like(torch.ones(4), x)


def test_sample_logit_normal_moments():
    t = sample_logit_normal(50_000, mean=-0.4, std=1.0, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() + 0.4) < 0.03 and abs(logit.std().item() - 1.0) < 0.03


@pytest.mark.parametrize("frac", [0.75, 0.0, 1.0])
def test_sample_meanflow_times(frac):
    n = 40_000
    r, t = sample_meanflow_times(n, equal_fraction=frac, generator=torch.Generator().manual_seed(0))
    assert r.shape == t.shape == (n,)
    assert (r <= t).all() and (r > 0).all() and (t < 1).all()
    equal = r == t
    assert abs(equal.float().mean().item() - frac) < 4 * math.sqrt(frac * (1 - frac) / n) + 1e-9
    # the unequal pairs are two iid logit-normal draws, so pooled they keep its moments
    if frac < 1:
        pooled = torch.logit(torch.cat([r[~equal], t[~equal]]).double())
        assert abs(pooled.mean().item() + 0.4) < 0.03 and abs(pooled.std().item() - 1.0) < 0.03
        assert torch.logit(t[~equal].double()).mean() > torch.logit(r[~equal].double()).mean() + 0.5
