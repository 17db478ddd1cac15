"""Opt-in, revertible: make an unmodified diffusers multistep DPM-Solver++ scheduler use the fused step.

``handle = patch_dpm_solver_scheduler(scheduler)`` replaces, on that one scheduler instance, the three
update methods ``step()`` calls (``dpm_solver_first_order_update``,
``multistep_dpm_solver_second_order_update``, ``multistep_dpm_solver_third_order_update``) by versions that
expand diffusers' own update formula into x_t = a·sample + b0·m0 + b1·m1 + b2·m2 on the host (float64) and
run it as one ``kernels.dpm_solver_step.dpm_solver_pp_step`` (the Triton kernel on CUDA, per
``kernels.dispatch``). ``handle.revert()`` (or leaving ``with patch_dpm_solver_scheduler(s):``) restores the
class's methods. Nothing global changes: other schedulers, and the class, are untouched.

Supported: ``DPMSolverMultistepScheduler`` and ``EDMDPMSolverMultistepScheduler`` (diffusers 0.42 update
formulas; subclasses that override an update method are refused). Fused: ``algorithm_type="dpmsolver++"``
(data prediction, the ODE solver) at orders 1/2/3, ``solver_type`` "midpoint" or "heun" at order 2 — with
any noise schedule, sigma grid (Karras, exponential, beta, λ-uniform, flow sigmas, final sigma zero),
``prediction_type``, ``variance_type`` and thresholding, since those act in ``set_timesteps`` /
``convert_model_output``, not in the update. Falls back to the original method (counted in
``handle.calls["original"]``): ``algorithm_type`` "dpmsolver" (noise prediction), "sde-dpmsolver++",
"sde-dpmsolver" (their noise term), any unknown solver_type, the deprecated positional
``timestep``/``prev_timestep`` call forms, and model outputs whose shape differs from the sample's.

diffusers works in VP form (α_t, σ_t), λ = ln α − ln σ, h = λ_t − λ_s0, r0 = h_0/h, r1 = h_1/h. With
φ1 = e^{−h} − 1, φ2 = φ1/h + 1, φ3 = (φ1 + h)/h² − ½ (their 3rd-order D2 weight), their updates are
- order 1:            x_t = (σ_t/σ_s0)·x − α_t·φ1·m0
- order 2 midpoint:   x_t = (σ_t/σ_s0)·x − α_t·φ1·m0 − ½·α_t·φ1·D1,     D1 = (m0 − m1)/r0
- order 2 heun:       x_t = (σ_t/σ_s0)·x − α_t·φ1·m0 + α_t·φ2·D1
- order 3:            x_t = (σ_t/σ_s0)·x − α_t·φ1·m0 + α_t·φ2·D1 − α_t·φ3·D2, with D1_0 = (m0 − m1)/r0,
                      D1_1 = (m1 − m2)/r1, D1 = D1_0 + r0/(r0+r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1)
which :func:`diffusers_dpm_solver_pp_coefficients` expands. The patched result equals the original up to
float32 rounding: diffusers evaluates its coefficients in the sigmas' dtype (float32) with ``exp(−h) − 1``;
here they are float64 with ``expm1``, and the combination is accumulated in float32 once.
"""
from __future__ import annotations

import types
from collections import Counter
from functools import reduce

import torch
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

from kernels.dpm_solver_step import dpm_solver_pp_step

SCHEDULERS = (DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler)
# update method name -> the order it implements (its first argument: one output, or the output list)
UPDATES = {"dpm_solver_first_order_update": 1,
           "multistep_dpm_solver_second_order_update": 2,
           "multistep_dpm_solver_third_order_update": 3}


def diffusers_dpm_solver_pp_coefficients(lambdas, alpha_t, sigma_t, sigma_s0, *, order: int,
                                         solver_type: str = "midpoint") -> tuple[float, float, float, float]:
    """(a, b0, b1, b2) of diffusers' DPM-Solver++ update of ``order`` for outputs (m0, m1, m2), in float64.

    ``lambdas`` = (λ_t, λ_s0[, λ_s1[, λ_s2]]); α_t, σ_t, σ_s0 as in diffusers. See the module doc.
    """
    lam = [torch.as_tensor(v, dtype=torch.float64) for v in lambdas]
    alpha_t, sigma_t, sigma_s0 = (torch.as_tensor(v, dtype=torch.float64) for v in (alpha_t, sigma_t, sigma_s0))
    h = lam[0] - lam[1]
    phi1 = torch.expm1(-h)
    a = sigma_t / sigma_s0
    b0, b1, b2 = -alpha_t * phi1, torch.zeros_like(a), torch.zeros_like(a)
    if order == 2:
        r0 = (lam[1] - lam[2]) / h
        # weight of D1 = (m0 − m1)/r0
        w = -0.5 * alpha_t * phi1 if solver_type == "midpoint" else alpha_t * (phi1 / h + 1)
        b0, b1 = b0 + w / r0, -w / r0
    elif order == 3:
        r0, r1 = (lam[1] - lam[2]) / h, (lam[2] - lam[3]) / h
        phi2 = phi1 / h + 1
        phi3 = (phi1 + h) / h ** 2 - 0.5
        # α_t·(φ2·D1 − φ3·D2) in the first differences D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1
        c10 = alpha_t * (phi2 * (1 + r0 / (r0 + r1)) - phi3 / (r0 + r1))
        c11 = alpha_t * (phi3 / (r0 + r1) - phi2 * r0 / (r0 + r1))
        b0 = b0 + c10 / r0
        b1 = c11 / r1 - c10 / r0
        b2 = -c11 / r1
    elif order != 1:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    return tuple(float(c) for c in (a, b0, b1, b2))


def _covered(scheduler, order: int) -> bool:
    config = scheduler.config
    return config.algorithm_type == "dpmsolver++" and (order != 2 or config.solver_type in ("midpoint", "heun"))


def _scheduler_coefficients(scheduler, order: int) -> tuple[float, float, float, float]:
    """The step's coefficients from the scheduler's own sigmas and (α, σ) conversion, in float64."""
    index = scheduler.step_index
    alphas, sigmas = [], []
    for k in range(order + 1):                       # t = index + 1, s0 = index, s1 = index − 1, …
        sigma = scheduler.sigmas[index + 1 - k].detach().to("cpu", torch.float64)
        alpha_k, sigma_k = scheduler._sigma_to_alpha_sigma_t(sigma)
        alphas.append(torch.as_tensor(alpha_k, dtype=torch.float64))
        sigmas.append(torch.as_tensor(sigma_k, dtype=torch.float64))
    lambdas = [torch.log(a) - torch.log(s) for a, s in zip(alphas, sigmas)]
    return diffusers_dpm_solver_pp_coefficients(lambdas, alphas[0], sigmas[0], sigmas[1], order=order,
                                                solver_type=scheduler.config.solver_type)


def _fused_update(name: str, order: int, original):
    """A drop-in for the update method ``name``: fused when covered, ``original(self, ...)`` otherwise."""

    def update(self, first, *args, **kwargs):
        sample = kwargs.get("sample")
        outputs = [first] if order == 1 else list(first)[-1:-order - 1:-1]      # m0, m1, m2
        fusable = (not args and set(kwargs) <= {"sample", "noise"} and isinstance(sample, torch.Tensor)
                   and self.step_index is not None and _covered(self, order)
                   and all(isinstance(m, torch.Tensor) and m.shape == sample.shape for m in outputs))
        if not fusable:
            self._fused_step_calls["original"] += 1
            return original(self, first, *args, **kwargs)
        dtype = reduce(torch.promote_types, [m.dtype for m in outputs], sample.dtype)  # diffusers' result dtype
        out = None if dtype == sample.dtype else torch.empty(sample.shape, dtype=dtype, device=sample.device)
        self._fused_step_calls["fused"] += 1
        return dpm_solver_pp_step(sample, *outputs, coeffs=_scheduler_coefficients(self, order), out=out)

    update.__name__ = update.__qualname__ = name
    update.__doc__ = f"Fused (kernels.patch_dpm_solver_scheduler) {name}; falls back to diffusers' own where not covered."
    return update


class PatchHandle:
    """The patch on one scheduler: ``revert()`` it, or use it as a context manager.

    ``calls`` counts update calls by path: ``{"fused": n, "original": m}``.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.calls = Counter()
        self.active = False

    def apply(self) -> "PatchHandle":
        scheduler = self.scheduler
        base = next((cls for cls in SCHEDULERS if isinstance(scheduler, cls)), None)
        if base is None:
            raise TypeError(f"{type(scheduler).__name__} is not a DPMSolverMultistepScheduler or "
                            "EDMDPMSolverMultistepScheduler")
        for name in UPDATES:
            if getattr(type(scheduler), name) is not getattr(base, name):
                raise TypeError(f"{type(scheduler).__name__} overrides {name}: its update formula is not the one "
                                f"patch_dpm_solver_scheduler reproduces")
            if name in vars(scheduler):
                raise RuntimeError(f"this scheduler's {name} is already replaced on the instance (patched twice?)")
        for name, order in UPDATES.items():
            setattr(scheduler, name, types.MethodType(_fused_update(name, order, getattr(base, name)), scheduler))
        scheduler._fused_step_calls = self.calls
        self.active = True
        return self

    def revert(self) -> None:
        """Restore the class's update methods on the scheduler (idempotent)."""
        if not self.active:
            return
        for name in UPDATES:
            vars(self.scheduler).pop(name, None)
        vars(self.scheduler).pop("_fused_step_calls", None)
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def patch_dpm_solver_scheduler(scheduler) -> PatchHandle:
    """Patch ``scheduler`` (an instance) to use the fused DPM-Solver++ step; returns the revert handle."""
    return PatchHandle(scheduler).apply()
