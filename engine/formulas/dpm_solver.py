"""DPM-Solver++ (Lu et al. 2022), multistep, data prediction, for an EDM teacher (docs/method.md §3).

EDM means α = 1, σ_t = t, λ = −ln t. One step s0 → t is a linear combination of the current state and
the last denoiser outputs; its coefficients depend only on the times, so they are computed once, in
float64, and the step itself is one fused multiply-add over the tensors (``kernels.dpm_solver_pp_step``).
"""
import torch


def dpm_solver_pp_coefficients(t, s0, s1=None, s2=None, *, order: int):
    """(a, b0, b1, b2) with x_t = a·x_s0 + b0·D0 + b1·D1 + b2·D2 for one DPM-Solver++ step s0 → t.

    D_k is the denoiser output at s_k (s0 the current time, s1/s2 the previous ones). This is docs/method.md §3's
    formula expanded into one linear combination, so the step is a single fused multiply-add over the
    tensors (the kernel target). Computed in float64: the φ-functions cancel badly in lower precision.
    Order 3 is DPM-Solver++'s 3M step (Lu et al. 2022); its local error is O(h³), like order 2, because its
    D2 estimates h²·D''/2 where the φ3 term needs h²·D'' (the sampling tests measure this).
    Times are floats (returns floats) or tensors (returns float64 tensors of their broadcast shape).
    """
    if order not in (1, 2, 3) or (order >= 2 and s1 is None) or (order == 3 and s2 is None):
        raise ValueError(f"order {order} needs times s0..s{order - 1}")
    as_floats = not any(isinstance(v, torch.Tensor) for v in (t, s0, s1, s2))
    t, s0, s1, s2 = (None if v is None else torch.as_tensor(v, dtype=torch.float64) for v in (t, s0, s1, s2))
    h = torch.log(s0) - torch.log(t)                  # λ_t − λ_s0 with λ = −ln σ
    phi1 = torch.expm1(-h)
    a = t / s0
    b0, b1, b2 = -phi1, torch.zeros_like(a), torch.zeros_like(a)
    if order == 2:
        r0 = (torch.log(s1) - torch.log(s0)) / h
        b1 = phi1 / (2 * r0)                          # from −½·φ1·(D0 − D1)/r0
        b0 = -phi1 - b1
    elif order == 3:
        r0 = (torch.log(s1) - torch.log(s0)) / h
        r1 = (torch.log(s2) - torch.log(s1)) / h
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        # φ2·D1 − φ3·D2 of docs/method.md §3 written in the first differences D1_0 = (D0−D1)/r0, D1_1 = (D1−D2)/r1.
        c10 = phi2 * (1 + r0 / (r0 + r1)) - phi3 / (r0 + r1)
        c11 = phi3 / (r0 + r1) - phi2 * r0 / (r0 + r1)
        b0 = -phi1 + c10 / r0
        b1 = c11 / r1 - c10 / r0
        b2 = -c11 / r1
    coeffs = (a, b0, b1, b2)
    return tuple(float(c) for c in coeffs) if as_floats else coeffs
