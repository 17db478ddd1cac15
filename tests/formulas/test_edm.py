"""EDM parameterisation (docs/method.md §2), flow-matching / MeanFlow relations (§5) and the per-sample
broadcast helpers: the pure formulas of engine.formulas (their network wrappers: tests/models/test_precond.py)."""

import math

import pytest
import torch

from engine.formulas.broadcast import accumulation_dtype, expand_like, per_sample
from engine.formulas.edm import (consistency_precond_coeffs, edm_loss_weight, edm_precond_coeffs, pf_ode_drift,
                                 sample_edm_sigma)
from engine.formulas.flow import (fm_interpolate, fm_velocity_target, meanflow_step, sample_logit_normal,
                                  sample_meanflow_times)

SD = 0.5


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


def test_meanflow_step():
    x, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8, 1.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    v = fm_velocity_target(x, eps)
    z_t = fm_interpolate(x, eps, t)
    # the straight path has constant velocity, so its average velocity on [r, t] is v itself
    torch.testing.assert_close(meanflow_step(z_t, v, r, t), fm_interpolate(x, eps, r))
    assert torch.equal(meanflow_step(z_t, v, t, t), z_t)


def test_broadcast_helpers_and_their_errors():
    x = torch.zeros(3, 1, 2, 2)
    assert expand_like(torch.ones(3), x).shape == (3, 1, 1, 1)
    assert expand_like(0.5, x).ndim == 0
    with pytest.raises(ValueError):
        expand_like(torch.ones(4), x)
    assert per_sample(0.5, x).shape == (3,) and per_sample(torch.ones(3), x, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        per_sample(torch.ones(2), x)
    # arithmetic never runs below float32, and float64 stays float64
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    assert [accumulation_dtype(torch.zeros(1, dtype=d)) for d in dtypes] == [torch.float32] * 3 + [torch.float64]


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
