"""Flow-matching and MeanFlow relations (SPEC §5).

Convention: ``z_t = (1 - t)·x + t·ε`` with t ∈ [0, 1], t = 1 is pure noise and the
velocity is ``v = ε - x``. Per-sample times are [B] tensors (or Python floats).
"""

import torch


def expand_like(s, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample scalar ([B], 0-d or float) to [B, 1, 1, ...] so it multiplies ``x``."""
    s = torch.as_tensor(s, device=x.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"expected a per-sample tensor of shape [{x.shape[0]}], got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def fm_interpolate(x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Point on the straight path from data x (t=0) to noise ε (t=1)."""
    t = expand_like(t, x)
    return (1 - t) * x + t * eps


def fm_velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Conditional velocity dz/dt of the straight path; the flow-matching regression target."""
    return eps - x


def meanflow_step(z_t: torch.Tensor, u: torch.Tensor, r, t) -> torch.Tensor:
    """Jump from time t to time r with the average velocity u on [r, t]: z_r = z_t − (t − r)·u."""
    return z_t - expand_like(torch.as_tensor(t) - torch.as_tensor(r), z_t) * u


def velocity_to_denoised(z_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """x-prediction implied by a velocity: x̂ = z_t − t·v (exact for the straight path)."""
    return z_t - expand_like(t, z_t) * v


def denoised_to_velocity(z_t: torch.Tensor, denoised: torch.Tensor, t) -> torch.Tensor:
    """Velocity implied by an x-prediction: v = (z_t − x̂)/t (t > 0)."""
    return (z_t - denoised) / expand_like(t, z_t)


def fm_time_to_sigma(t):
    """EDM noise level of FM time t: z_t/(1−t) = x + σ·ε with σ = t/(1−t)."""
    return t / (1 - t)


def sigma_to_fm_time(sigma):
    """Inverse of :func:`fm_time_to_sigma`: t = σ/(1+σ); the FM state is z_t = x_σ/(1+σ)."""
    return sigma / (1 + sigma)


def sample_logit_normal(batch: int, mean: float = 0.0, std: float = 1.0, generator=None,
                        device=None) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(mean, std²): concentrates training on mid-range times."""
    n = torch.randn(batch, generator=generator, device=device) * std + mean
    return torch.sigmoid(n)


def sample_meanflow_times(batch: int, mean: float = -0.4, std: float = 1.0,
                          equal_fraction: float = 0.75, generator=None, device=None):
    """(r, t) for MeanFlow training: two logit-normal draws sorted so r ≤ t, then r = t for each
    sample independently with probability ``equal_fraction`` (those samples train plain FM)."""
    a = sample_logit_normal(batch, mean, std, generator=generator, device=device)
    b = sample_logit_normal(batch, mean, std, generator=generator, device=device)
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    equal = torch.rand(batch, generator=generator, device=device) < equal_fraction
    return torch.where(equal, t, r), t
