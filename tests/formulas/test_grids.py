"""Time grids of engine.formulas.grids: λ-uniform EDM σ (docs/method.md §3), Karras/EDM-Heun σ, uniform FM t."""
import math

import pytest
import torch

from engine.formulas.grids import edm_lambda_uniform_sigmas, fm_uniform_times, karras_sigmas


def test_lambda_uniform_default_grid():
    sigmas = edm_lambda_uniform_sigmas()
    assert sigmas.shape == (17,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-15)
    assert sigmas[-1].item() == pytest.approx(0.002, rel=1e-13)
    # docs/method.md §3's t_7 = 0.77569: the grid entry 7 steps below σ_max.
    assert sigmas[7].item() == pytest.approx(0.77569, abs=5e-6)
    steps = torch.diff(-sigmas.log())                 # λ = −ln σ increases by the same h every step
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(80.0 / 0.002) / 16), rtol=1e-12, atol=0)


def test_lambda_uniform_dtype_and_range():
    sigmas = edm_lambda_uniform_sigmas(4, 0.01, 2.0, dtype=torch.float32)
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, torch.tensor([2.0, 2.0 * 200 ** -0.25, 2.0 * 200 ** -0.5,
                                                     2.0 * 200 ** -0.75, 0.01]))


def test_karras_is_edm_heun_grid():
    sigmas = karras_sigmas(18)
    assert sigmas.shape == (19,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-14)
    assert sigmas[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert sigmas[-1].item() == 0.0
    assert (torch.diff(sigmas) < 0).all()
    steps = torch.diff(sigmas[:-1] ** (1 / 7))        # uniform in σ^(1/ρ)
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-10, atol=0)


def test_karras_rho_one_is_uniform_in_sigma():
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0),
                               torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64))


def test_karras_rejects_single_step():
    with pytest.raises(ValueError):
        karras_sigmas(1)


def test_fm_uniform_times():
    torch.testing.assert_close(fm_uniform_times(8), torch.arange(8, -1, -1, dtype=torch.float64) / 8)
    torch.testing.assert_close(fm_uniform_times(2, 0.6, 0.2, dtype=torch.float32), torch.tensor([0.6, 0.4, 0.2]))
