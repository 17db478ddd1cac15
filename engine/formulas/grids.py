"""Time grids for the teacher samplers.

Every grid is a 1-D tensor of ``num_steps + 1`` times in the order the sampler visits them
(noise first), so ``grid[i] -> grid[i + 1]`` is step i. Built in float64 by default because the
solver coefficients are computed from them in float64 (docs/method.md §3).
"""

import torch


def edm_lambda_uniform_sigmas(num_steps: int = 16, sigma_min: float = 0.002, sigma_max: float = 80.0,
                              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """σ_max·(σ_min/σ_max)^(i/N), i = 0..N: uniform in λ = −ln σ, the grid DPM-Solver++ is built for.

    For the defaults, entry 7 is 0.77569 (docs/method.md §3's t_7).
    """
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    return (sigma_max * (sigma_min / sigma_max) ** (i / num_steps)).to(dtype)


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM's Heun grid: ``num_steps`` levels uniform in σ^(1/ρ) from σ_max to σ_min, then a last step to 0.

    Steps are denser near σ_min, where the PF-ODE curves most; the final step to 0 makes the sampler
    return the denoised image.
    """
    if num_steps < 2:
        raise ValueError("karras_sigmas needs num_steps >= 2 (it spans σ_max..σ_min, then 0)")
    ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def fm_uniform_times(num_steps: int, t_start: float = 1.0, t_end: float = 0.0,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Equal steps in flow-matching time from noise (t=1) to data (t=0), the authors' MeanFlow grid."""
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).to(dtype)
