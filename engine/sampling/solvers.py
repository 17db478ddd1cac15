"""Teacher ODE samplers: DPM-Solver++ (docs/method.md §3), EDM Euler/Heun, flow-matching Euler/Heun, MeanFlow.

Shared API: ``sampler(model_fn, x_start, times) -> list`` of every state from ``x_start`` to the end,
one per grid entry, because mid-training regresses from all intermediate states (paper Eq. 7 and 8).
``times`` is [N+1] (one grid for the batch) or [N+1, B] (a grid per sample, e.g. Slow CMT where each
sample starts at its own σ); in the latter case every coefficient is a [B] tensor broadcast over the
remaining dims. The model receives times as a [B] tensor.

States keep ``x_start``'s dtype; each update is accumulated in at least float32 (half inputs are
upcast) and cast back, so a bf16 rollout does not also lose the arithmetic of the step.
"""

from typing import Optional

import torch

from engine.formulas.broadcast import accumulation_dtype, expand_like, per_sample
from engine.formulas.dpm_solver import dpm_solver_pp_coefficients
from engine.formulas.edm import pf_ode_drift
from engine.formulas.flow import meanflow_step
from kernels.dpm_solver_step import dpm_solver_pp_step


def _model_times(times_row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A grid row (0-d or [B]) as the [B] time tensor a model takes, in x's accumulation dtype."""
    return per_sample(times_row, x, accumulation_dtype(x))


def _step_size(c, x: torch.Tensor) -> torch.Tensor:
    """A step scalar (float, 0-d or [B]) in the accumulation dtype, shaped to multiply x."""
    return expand_like(torch.as_tensor(c, dtype=accumulation_dtype(x), device=x.device), x)


def _steps_to_zero(times: torch.Tensor) -> list:
    """Per step, whether it lands on time 0, where λ = +∞ and only first-order / Euler steps are defined."""
    zero = (times[1:] == 0).reshape(times.shape[0] - 1, -1)
    all_zero, any_zero = zero.all(dim=1).tolist(), zero.any(dim=1).tolist()
    if all_zero != any_zero:
        raise ValueError("a grid row mixes time 0 with positive times")
    return all_zero


def dpm_solver_pp(denoise, x_T: torch.Tensor, sigmas: torch.Tensor, order: int = 3,
                  lower_order_final: bool = True, out: Optional[torch.Tensor] = None) -> list:
    """Multistep DPM-Solver++ (data prediction) for an EDM teacher ``denoise(x, sigma[B])``; N calls.

    Step orders warm up as [1, 2, 3, 3, …] (the history of past outputs is short at the start) and, with
    ``lower_order_final``, wind down symmetrically to […, 3, 2, 1], which keeps few-step solves stable.
    A step onto σ = 0 is always first order (λ = +∞ there); it returns the denoiser output.

    ``out``: a preallocated trajectory buffer [N+1, B, ...] (or [N, B, ...] to leave the end state out),
    any batch stride, each sample contiguous — e.g. a transposed view of a trajectory-major pair buffer.
    State i lands in ``out[i]``: x_T by one copy (skipped when x_T already is ``out[0]``), every later state
    by the fused step's second store, so the trajectory is never stacked afterwards. The returned list then
    holds those slots (and the end state as its own tensor when ``out`` has N slots); the solver itself keeps
    only the running state and the denoiser history.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    num_steps = sigmas.shape[0] - 1
    if out is not None:
        if out.shape[0] not in (num_steps, num_steps + 1) or out.shape[1:] != x_T.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected [{num_steps + 1} or {num_steps}, "
                             f"{', '.join(map(str, x_T.shape))}] for {num_steps} steps from x_T")
        if (out[0].data_ptr(), out[0].stride()) != (x_T.data_ptr(), x_T.stride()):
            out[0].copy_(x_T)
    to_zero = _steps_to_zero(sigmas)
    grid = sigmas.tolist() if sigmas.ndim == 1 else sigmas.to(torch.float64)
    x, states, history = x_T, [x_T if out is None else out[0]], []
    for i in range(num_steps):
        history = [denoise(x, _model_times(sigmas[i], x))] + history[:order - 1]
        step_order = 1 if to_zero[i] else min(order, i + 1, num_steps - i if lower_order_final else order)
        past = [grid[i - k] for k in range(1, step_order)]
        coeffs = dpm_solver_pp_coefficients(grid[i + 1], grid[i], *past, order=step_order)
        outputs = history[:step_order] + [None] * (3 - step_order)
        slot = out[i + 1] if out is not None and i + 1 < out.shape[0] else None
        x = dpm_solver_pp_step(x, *outputs, coeffs=coeffs, slot=slot)
        states.append(x if slot is None else slot)
    return states


def edm_euler(denoise, x_T: torch.Tensor, sigmas: torch.Tensor) -> list:
    """Euler on the PF-ODE dx/dσ = (x − D(x;σ))/σ; N denoiser calls."""
    x, states = x_T, [x_T]
    for i in range(sigmas.shape[0] - 1):
        sigma = _model_times(sigmas[i], x)
        drift = pf_ode_drift(x.to(sigma.dtype), denoise(x, sigma), sigma)
        x = (x + _step_size(sigmas[i + 1] - sigmas[i], x) * drift).to(x_T.dtype)
        states.append(x)
    return states


def edm_heun(denoise, x_T: torch.Tensor, sigmas: torch.Tensor) -> list:
    """EDM's second-order Heun: Euler predictor, trapezoidal corrector.

    The corrector needs the drift at the step's end, undefined at σ = 0, so a step onto σ = 0 stays Euler:
    2N − 1 denoiser calls on grids ending at 0, 2N on grids ending at σ_min > 0.
    """
    to_zero = _steps_to_zero(sigmas)
    x, states = x_T, [x_T]
    for i in range(sigmas.shape[0] - 1):
        sigma, sigma_next = _model_times(sigmas[i], x), _model_times(sigmas[i + 1], x)
        step = _step_size(sigmas[i + 1] - sigmas[i], x)
        x_acc = x.to(sigma.dtype)
        drift = pf_ode_drift(x_acc, denoise(x, sigma), sigma)
        x_next = (x_acc + step * drift).to(x_T.dtype)
        if not to_zero[i]:
            drift_next = pf_ode_drift(x_next.to(sigma.dtype), denoise(x_next, sigma_next), sigma_next)
            x_next = (x_acc + step * (drift + drift_next) / 2).to(x_T.dtype)
        x = x_next
        states.append(x)
    return states


def fm_euler(velocity, z_1: torch.Tensor, times: torch.Tensor) -> list:
    """Euler on dz/dt = v(z, t) from noise (t=1) towards data; N velocity calls."""
    z, states = z_1, [z_1]
    for i in range(times.shape[0] - 1):
        v = velocity(z, _model_times(times[i], z))
        z = (z.to(accumulation_dtype(z)) + _step_size(times[i + 1] - times[i], z) * v).to(z_1.dtype)
        states.append(z)
    return states


def fm_heun(velocity, z_1: torch.Tensor, times: torch.Tensor) -> list:
    """Heun on dz/dt = v(z, t); corrects every step (the velocity is finite at t = 0): 2N velocity calls."""
    z, states = z_1, [z_1]
    for i in range(times.shape[0] - 1):
        step = _step_size(times[i + 1] - times[i], z)
        z_acc = z.to(accumulation_dtype(z))
        v = velocity(z, _model_times(times[i], z))
        z_pred = (z_acc + step * v).to(z_1.dtype)
        v_next = velocity(z_pred, _model_times(times[i + 1], z))
        z = (z_acc + step * (v + v_next) / 2).to(z_1.dtype)
        states.append(z)
    return states


def meanflow_multistep(avg_velocity, z_1: torch.Tensor, times: torch.Tensor) -> list:
    """MeanFlow jumps z_r = z_t − (t − r)·u(z_t, r, t) between consecutive grid times; N calls."""
    z, states = z_1, [z_1]
    for i in range(times.shape[0] - 1):
        t, r = _model_times(times[i], z), _model_times(times[i + 1], z)
        z = meanflow_step(z.to(t.dtype), avg_velocity(z, r, t), r, t).to(z_1.dtype)
        states.append(z)
    return states
