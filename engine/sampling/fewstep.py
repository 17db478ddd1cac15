"""Few-step samplers for flow maps (docs/method.md §6): consistency functions f(x, σ) and MeanFlow u(z, r, t).

Same API shape as :mod:`engine.sampling.solvers`: each sampler returns the list of every state it visits, one per
grid entry, starting with the input and ending with the sample.

- Consistency (EDM σ): states at σ = [σ_max, τ_1, …, τ_{N−1}, 0]. The first state is x_T = σ_max·ε; each
  step maps the state to data with f, and every step but the last re-noises that estimate to the next
  level τ_i with ``x̂ + s·ε'``. ``renoise_std`` sets s: ``tau`` (s = τ_i, what ECT's and the CMT authors'
  code add) or the engine's default ``sqrt_tau2_minus_sigma_min2`` (s = √(τ_i² − σ_min²): f's output read
  as a sample at σ_min, so the total noise level is τ; docs/deviations.md). The last state is f's output.
- MeanFlow (FM t): states at t = [1, …, 0] on a uniform grid, via :func:`engine.sampling.solvers.meanflow_multistep`;
  1 step is ``x = z_1 − u(z_1, 0, 1)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.formulas.broadcast import accumulation_dtype
from engine.formulas.edm import SIGMA_MAX, SIGMA_MIN
from engine.sampling.solvers import meanflow_multistep


def consistency_levels(steps: int | None = 1, t_mid: float | None = None,
                       levels: Sequence[float] | None = None) -> list:
    """The re-noise levels after the first step: [] for 1 step, [t_mid] for 2, ``levels`` for any N.

    ``levels`` (N−1 decreasing σ values) sets the number of steps; ``steps`` (if not None) must agree.
    """
    if levels is not None:
        levels = [float(v) for v in levels]
        if steps is not None and len(levels) != steps - 1:
            raise ValueError(f"{steps} consistency steps need {steps - 1} re-noise levels, got {len(levels)}")
        return levels
    if steps == 1:
        return []
    if steps == 2:
        if t_mid is None:
            raise ValueError("2-step consistency sampling re-noises to t_mid: pass it (sample.t_mid)")
        return [float(t_mid)]
    raise ValueError(f"consistency sampling with {steps} steps needs its re-noise levels: pass levels=[...] "
                     f"({steps - 1} decreasing σ values)")


def renoise_scale(tau: float, sigma_min: float, renoise_std: str) -> float:
    """The std of the noise added to re-noise to level τ: τ (ECT's and the authors' code), or √(τ² − σ_min²)
    (the engine's default: the state f(x) ≈ x_0 is read as already at σ_min)."""
    if renoise_std == "tau":
        return float(tau)
    if renoise_std == "sqrt_tau2_minus_sigma_min2":
        return (tau ** 2 - sigma_min ** 2) ** 0.5
    raise ValueError(f"renoise_std must be 'tau' or 'sqrt_tau2_minus_sigma_min2', got {renoise_std!r}")


@torch.no_grad()
def consistency_sample(f, x_T_noise: torch.Tensor, sigma_max: float = SIGMA_MAX, steps: int | None = 1,
                       t_mid: float | None = None, sigma_min: float = SIGMA_MIN,
                       generator: torch.Generator | None = None,
                       levels: Sequence[float] | None = None,
                       renoise: Sequence[torch.Tensor] | None = None,
                       renoise_std: str = "sqrt_tau2_minus_sigma_min2") -> list:
    """Multistep consistency sampling with ``f(x, sigma[B])``; one f call per step.

    ``steps`` 1 or 2 (re-noise to ``t_mid``); for N steps pass ``levels`` (then ``steps`` may be None).
    ``x_T_noise`` is unit Gaussian noise ε (the first state is σ_max·ε); re-noising draws ε' from
    ``generator``, or takes the i-th of ``renoise`` (unit noise shaped like x, one per re-noise level: each
    image's own, for results that do not depend on the batch). Returns [σ_max·ε, x_{τ_1}, …, sample].
    """
    levels = consistency_levels(steps, t_mid, levels)
    prev = sigma_max
    for tau in levels:
        if not sigma_min < tau < prev:
            raise ValueError(f"re-noise levels must decrease strictly within (sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}), got {levels}")
        prev = tau
    b = x_T_noise.shape[0]
    x = sigma_max * x_T_noise
    states = [x]
    for i, sigma in enumerate([sigma_max, *levels]):
        denoised = f(x, torch.full((b,), float(sigma), device=x.device, dtype=accumulation_dtype(x)))
        if i == len(levels):
            states.append(denoised.to(x_T_noise.dtype))
            break
        tau = levels[i]
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if renoise is None \
            else renoise[i].to(x.device, x.dtype)
        x = (denoised + renoise_scale(tau, sigma_min, renoise_std) * eps).to(x_T_noise.dtype)
        states.append(x)
    return states


@torch.no_grad()
def meanflow_sample(u, z_1: torch.Tensor, steps: int = 1, times: torch.Tensor | None = None) -> list:
    """MeanFlow sampling with ``u(z, r[B], t[B])`` on uniform times 1 → 0 (or the given ``times``).

    1 step: [z_1, z_1 − u(z_1, 0, 1)]; 2 steps: times [1, 0.5, 0]. ``steps`` model calls.
    """
    if times is None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return meanflow_multistep(u, z_1, times)
