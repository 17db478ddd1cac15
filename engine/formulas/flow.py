"""Flow-matching and MeanFlow relations (paper §2.1, §3.3; docs/method.md §5).

Convention: ``z_t = (1 - t)·x + t·ε`` with t ∈ [0, 1], t = 1 is pure noise and the
velocity is ``v = ε - x``. Per-sample times are [B] tensors (or Python floats).
"""

import torch

from engine.formulas.broadcast import expand_like


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
