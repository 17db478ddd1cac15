"""EDM parameterisation (Karras et al. 2022; docs/method.md §2): x_σ = x_0 + σ·ε,
D(x;σ) = c_skip·x + c_out·F(c_in·x; c_noise).

All functions take σ as a tensor (per sample [B], or any shape) and return tensors of the same shape;
the caller broadcasts them over images with :func:`engine.formulas.broadcast.expand_like`.
"""

import torch

from engine.formulas.broadcast import expand_like

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5


def edm_precond_coeffs(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise): unit-variance network input and target at every σ."""
    s2 = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def consistency_precond_coeffs(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA,
                               sigma_min: float = SIGMA_MIN):
    """EDM coefficients shifted so c_skip(σ_min)=1 and c_out(σ_min)=0, hence f(x, σ_min) = x for any F."""
    _, _, c_in, c_noise = edm_precond_coeffs(sigma, sigma_data)
    d = sigma - sigma_min
    c_skip = sigma_data ** 2 / (d ** 2 + sigma_data ** 2)
    c_out = d * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = 1/c_out²: makes the effective target of F unit-weighted at every σ."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_edm_sigma(batch: int, P_mean: float = -1.2, P_std: float = 1.2, generator=None,
                     device=None) -> torch.Tensor:
    """Training noise levels, ln σ ~ N(P_mean, P_std²)."""
    return (torch.randn(batch, generator=generator, device=device) * P_std + P_mean).exp()


def pf_ode_drift(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """Probability-flow ODE dx/dσ = (x − D(x;σ))/σ."""
    return (x - denoised) / expand_like(sigma, x)


def ect_r_schedule(t, q: float, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's second time r(t) = t·(1 − (1/q)·(1 + k·sigmoid(−b·t))), clamped at 0 (docs/method.md §6).

    A fixed q: after CMT there is no annealing (paper App. B.2). Pure; t any shape."""
    t = torch.as_tensor(t)
    return (t * (1 - (1 + k * torch.sigmoid(-b * t)) / q)).clamp(min=0)
