"""Few-step samplers for flow maps (docs/method.md §6): consistency 1/2/N steps with re-noising, MeanFlow 1/2 steps."""
import math

import pytest
import torch

from engine.models.factory import build_raw_network, wrap_network
from engine.config import SampleConfig, load_config
from engine.sampling.fewstep import consistency_levels, consistency_sample, meanflow_sample

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
T_MID = 0.77569   # 2-step sampling's re-noise level (sample.t_mid): t_7 of the λ-uniform N = 16 grid


class Recorder:
    """A known function of (x, times...) that logs every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, *times):
        self.calls.append((x.clone(), *[s.clone() for s in times]))
        return self.fn(x, *times)


def col(s):
    return s.view(-1, 1, 1, 1)


def toy_f(x, sigma):
    """Not a consistency function, but a known one: every step's input is recoverable from its output."""
    return 0.5 * x / (1 + col(sigma)) + 0.1


def test_one_step_is_f_applied_once():
    eps = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    f = Recorder(toy_f)
    states = consistency_sample(f, eps, SIGMA_MAX, steps=1)
    assert len(f.calls) == 1 and len(states) == 2
    torch.testing.assert_close(states[0], SIGMA_MAX * eps)
    x, sigma = f.calls[0]
    torch.testing.assert_close(x, SIGMA_MAX * eps)
    assert sigma.shape == (5,) and (sigma == SIGMA_MAX).all()
    torch.testing.assert_close(states[-1], toy_f(SIGMA_MAX * eps, torch.full((5,), SIGMA_MAX)))


def test_two_steps_renoise_to_t_mid():
    eps = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    f = Recorder(toy_f)
    states = consistency_sample(f, eps, SIGMA_MAX, steps=2, t_mid=T_MID, generator=torch.Generator().manual_seed(7))
    assert len(f.calls) == 2 and len(states) == 3
    assert SampleConfig().t_mid == T_MID and (f.calls[1][1] == T_MID).all()
    first = toy_f(SIGMA_MAX * eps, torch.full((5,), SIGMA_MAX))
    eps2 = torch.randn(eps.shape, generator=torch.Generator().manual_seed(7))
    x_mid = first + math.sqrt(T_MID ** 2 - SIGMA_MIN ** 2) * eps2
    torch.testing.assert_close(states[1], x_mid)
    torch.testing.assert_close(f.calls[1][0], x_mid)
    torch.testing.assert_close(states[2], toy_f(x_mid, torch.full((5,), T_MID)))


def test_renoise_level_statistics():
    """With f ≡ 0 the re-noised state is pure noise of std √(t_mid² − σ_min²)."""
    eps = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    states = consistency_sample(lambda x, s: torch.zeros_like(x), eps, SIGMA_MAX, steps=2, t_mid=0.5,
                                generator=torch.Generator().manual_seed(1))
    assert states[1].std().item() == pytest.approx(math.sqrt(0.25 - SIGMA_MIN ** 2), rel=0.02)


def test_n_steps_with_levels_and_errors():
    eps = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    f = Recorder(toy_f)
    states = consistency_sample(f, eps, SIGMA_MAX, steps=None, levels=[5.0, 1.0, 0.1])
    assert len(states) == 5 and [c[1][0].item() for c in f.calls] == pytest.approx([80.0, 5.0, 1.0, 0.1])
    assert consistency_levels(1) == [] and consistency_levels(2, t_mid=0.3) == [0.3]
    with pytest.raises(ValueError, match="levels"):
        consistency_sample(f, eps, SIGMA_MAX, steps=3)
    with pytest.raises(ValueError, match="t_mid"):                  # 2 steps name their re-noise level
        consistency_sample(f, eps, SIGMA_MAX, steps=2)
    with pytest.raises(ValueError, match="2 re-noise levels"):
        consistency_sample(f, eps, SIGMA_MAX, steps=3, levels=[1.0])
    with pytest.raises(ValueError, match="decrease"):
        consistency_sample(f, eps, SIGMA_MAX, steps=None, levels=[1.0, 2.0])


def test_exact_consistency_function_recovers_the_data_point():
    """Data = one point x*: the exact f(x, σ) = x* + (x − x*)·σ_min/σ maps any state there (up to σ_min)."""
    x_star = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    f = lambda x, s: x_star + (x - x_star) * SIGMA_MIN / col(s)
    eps = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2):
        out = consistency_sample(f, eps, SIGMA_MAX, steps=steps, t_mid=T_MID,
                                 generator=torch.Generator().manual_seed(1))[-1]
        assert (out - x_star).abs().max() < 0.02


def test_consistency_sample_with_a_real_network():
    cfg = load_config(None, ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
                             "network.unet.attn_resolutions=[]"])
    f = wrap_network(build_raw_network(cfg), cfg, "consistency").eval()
    eps = torch.randn(2, 1, 8, 8)
    states = consistency_sample(lambda x, s: f(x, s), eps, steps=2, t_mid=T_MID)
    assert [s.shape for s in states] == [eps.shape] * 3 and all(torch.isfinite(s).all() for s in states)


def toy_u(z, r, t):
    return 0.3 * z + col(t - r) * 0.2 + col(t) * 0.05


def test_meanflow_one_step_formula():
    z1 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    u = Recorder(toy_u)
    states = meanflow_sample(u, z1, steps=1)
    assert len(u.calls) == 1 and len(states) == 2
    _, r, t = u.calls[0]
    assert (r == 0).all() and (t == 1).all() and r.shape == (4,)
    torch.testing.assert_close(states[-1], z1 - toy_u(z1, torch.zeros(4), torch.ones(4)))


def test_meanflow_two_steps_uniform_times():
    z1 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    u = Recorder(toy_u)
    states = meanflow_sample(u, z1, steps=2)
    assert len(u.calls) == 2 and len(states) == 3
    assert [(c[1][0].item(), c[2][0].item()) for c in u.calls] == [(0.5, 1.0), (0.0, 0.5)]
    half, zero, one = torch.full((4,), 0.5), torch.zeros(4), torch.ones(4)
    z_half = z1 - 0.5 * toy_u(z1, half, one)
    torch.testing.assert_close(states[1], z_half)
    torch.testing.assert_close(states[2], z_half - 0.5 * toy_u(z_half, zero, half))


def test_meanflow_exact_average_velocity_recovers_the_data_point():
    """Data = one point x*: every path is straight, u(z, r, t) = (z − x*)/t, so one step lands on x*."""
    x_star = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    u = lambda z, r, t: (z - x_star) / col(t)
    z1 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 3):
        torch.testing.assert_close(meanflow_sample(u, z1, steps=steps)[-1], x_star.expand_as(z1))
