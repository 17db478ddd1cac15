"""DPM-Solver++ step coefficients of engine.formulas.dpm_solver (docs/method.md §3): the expansion into one
linear combination equals the step as written, for floats and per-sample tensors. The solver that uses
them is measured in tests/sampling/test_solvers.py."""

import math

import pytest
import torch

from engine.formulas.dpm_solver import dpm_solver_pp_coefficients

SHAPE = (3, 4, 4)
BATCH = 4


def spec_step(x, outputs, t, s, order):
    """docs/method.md §3's DPM-Solver++ step written literally (unexpanded), as the reference for the expansion."""
    lam = [-math.log(v) for v in s]
    h = -math.log(t) - lam[0]
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    D0 = outputs[0]
    if order == 1:
        return (t / s[0]) * x - phi1 * D0
    r0 = (lam[0] - lam[1]) / h
    D1_0 = (D0 - outputs[1]) / r0
    if order == 2:
        return (t / s[0]) * x - phi1 * D0 - 0.5 * phi1 * D1_0
    r1 = (lam[1] - lam[2]) / h
    D1_1 = (outputs[1] - outputs[2]) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    return (t / s[0]) * x - phi1 * D0 + phi2 * D1 - phi3 * D2


@pytest.mark.parametrize("order", [1, 2, 3])
def test_coefficients_expand_spec_formula(order):
    g = torch.Generator().manual_seed(3)
    x, *outputs = torch.randn(4, BATCH, *SHAPE, generator=g, dtype=torch.float64)
    t, s = 0.3, [0.5, 1.1, 1.9]
    coeffs = dpm_solver_pp_coefficients(t, *s[:order], order=order)
    assert all(isinstance(c, float) for c in coeffs)
    assert sum(coeffs) == pytest.approx(1.0, abs=1e-12)     # a constant trajectory x = D stays put
    # (a, b0, b1, b2) are defined by x_t = a·x + b0·D0 + b1·D1 + b2·D2 (only the first `order` D's exist)
    step = coeffs[0] * x + sum(b * d for b, d in zip(coeffs[1:order + 1], outputs))
    assert all(b == 0.0 for b in coeffs[order + 1:])
    torch.testing.assert_close(step, spec_step(x, outputs, t, s, order), rtol=1e-12, atol=1e-12)
    # The same step with per-sample tensors gives the same coefficients for every sample.
    per_sample = dpm_solver_pp_coefficients(torch.full((BATCH,), t, dtype=torch.float64),
                                            *[torch.full((BATCH,), v, dtype=torch.float64) for v in s[:order]],
                                            order=order)
    for c, c_b in zip(coeffs, per_sample):
        assert c_b.shape == (BATCH,) and c_b.dtype == torch.float64
        torch.testing.assert_close(c_b, torch.full((BATCH,), c, dtype=torch.float64), rtol=1e-15, atol=0)


def test_coefficients_need_the_times_of_their_order():
    # order 1 (DDIM in data prediction): x_t = (t/s)·x + (1 − t/s)·D0
    assert dpm_solver_pp_coefficients(0.3, 0.5, order=1) == pytest.approx((0.6, 0.4, 0.0, 0.0), rel=1e-14, abs=0)
    with pytest.raises(ValueError, match="order 2 needs times s0..s1"):
        dpm_solver_pp_coefficients(0.3, 0.5, order=2)
    with pytest.raises(ValueError, match="order 3 needs times s0..s2"):
        dpm_solver_pp_coefficients(0.3, 0.5, 1.1, order=3)
    with pytest.raises(ValueError):
        dpm_solver_pp_coefficients(0.3, 0.5, 1.1, 1.9, order=4)
