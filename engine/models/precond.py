"""Wrappers turning a raw network F into the function a stage or sampler calls.

Each keeps the raw network as ``.net`` so the same weights can move between parameterisations
(e.g. a consistency student initialised from an EDM teacher: ``ConsistencyFunction(teacher.net)``
after a deepcopy). Coefficients are computed in at least float32 whatever the network's precision.
"""

import torch
from torch import nn

from engine.formulas.broadcast import accumulation_dtype, expand_like, per_sample
from engine.formulas.edm import SIGMA_DATA, SIGMA_MIN, consistency_precond_coeffs, edm_precond_coeffs


def _per_sample(s, x):
    """A [B] time in at least x's accumulation dtype (a float64 σ stays float64)."""
    s = torch.as_tensor(s, device=x.device)
    return per_sample(s, x, torch.promote_types(s.dtype, accumulation_dtype(x)))


def _run(net: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The raw network on ``x`` in its parameters' dtype (bf16 once DeepSpeed's bf16 mode converted it), the
    output back in ``x``'s dtype: callers keep their float32 data, noise and targets either way. A released
    DiT/SiT's second output half (``learn_sigma``: DiT's variance, unused by SiT) is dropped."""
    dtype = next(net.parameters(), x).dtype   # a parameter-free function runs in x's dtype
    out = net(x.to(dtype), *args, **kwargs)
    if getattr(net, "learn_sigma", False):
        out = out[:, : x.shape[1]]
    return out.to(x.dtype)


class _Preconditioned(nn.Module):
    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def _apply_coeffs(self, x, coeffs, class_labels):
        c_skip, c_out, c_in, c_noise = (expand_like(c, x) for c in coeffs)
        xf = x.to(c_in.dtype)
        out = _run(self.net, (c_in * xf).to(x.dtype), c_noise.flatten(), class_labels=class_labels)
        return (c_skip * xf + c_out * out.to(c_out.dtype)).to(x.dtype)


class EDMDenoiser(_Preconditioned):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; ¼ ln σ) (EDM; docs/method.md §2). ``sigma``: [B] or scalar."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__(net, sigma_data)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        return self._apply_coeffs(x, edm_precond_coeffs(sigma, self.sigma_data), class_labels)


class ConsistencyFunction(_Preconditioned):
    """f(x, σ) with the boundary-condition coefficients: f(x, σ_min) = x exactly for any F.
    Defined for σ ≥ σ_min (c_noise = ¼ ln σ): a target at r = 0 is x_0 itself, chosen by the caller.

    ``train_coeffs="edm"`` is the authors' preconditioner: in training mode EDM's plain coefficients (so a
    student initialised from an EDM teacher starts as exactly that teacher), in eval mode the boundary
    form with ``eval_sigma_min`` (they use 0.003). ``"boundary"`` uses the boundary form with σ_min always."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 train_coeffs: str = "boundary", eval_sigma_min: float | None = None):
        super().__init__(net, sigma_data)
        if train_coeffs not in ("boundary", "edm"):
            raise ValueError(f"train_coeffs must be 'boundary' or 'edm', got {train_coeffs!r}")
        self.sigma_min, self.train_coeffs = sigma_min, train_coeffs
        self.eval_sigma_min = sigma_min if eval_sigma_min is None else eval_sigma_min

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        if self.training and self.train_coeffs == "edm":
            coeffs = edm_precond_coeffs(sigma, self.sigma_data)
        else:
            coeffs = consistency_precond_coeffs(sigma, self.sigma_data,
                                                self.sigma_min if self.training else self.eval_sigma_min)
        return self._apply_coeffs(x, coeffs, class_labels)


class FlowVelocity(nn.Module):
    """v(z, t) = F(z; t): the raw net predicts the velocity ε − x; t ∈ [0, 1] is passed unscaled as
    the noise label (the network's Fourier embedding is tuned for O(1) labels)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        return _run(self.net, z, _per_sample(t, z), class_labels=class_labels)


class MeanFlowModel(nn.Module):
    """u(z, r, t): average velocity on [r, t], so z_r = z_t − (t − r)·u; u(z, t, t) = v(z, t).
    Needs a network built with ``use_r=True`` (it embeds t and t − r)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not getattr(net, "use_r", False):
            raise ValueError("MeanFlowModel needs a network built with use_r=True")
        self.net = net

    def forward(self, z: torch.Tensor, r, t, class_labels=None) -> torch.Tensor:
        return _run(self.net, z, _per_sample(t, z), r_label=_per_sample(r, z), class_labels=class_labels)


# --------------------------------------------------------------------------------------------------
# Released networks with another clock (docs/teachers.md): converted here, at call time, never in the weights
# --------------------------------------------------------------------------------------------------
def ddpm_log_sigmas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ln σ_i (float64, increasing) of DDPM's discrete linear-β VP schedule: ᾱ_i = Π_{j≤i} (1 − β_j) and
    σ_i = √((1 − ᾱ_i)/ᾱ_i), the EDM noise level whose VP state x_i = √ᾱ_i·(y + σ_i·n) is what step i sees."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    alphabar = torch.cumprod(1 - betas, 0)
    return 0.5 * torch.log((1 - alphabar) / alphabar)


def ddpm_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) DDPM step of an EDM σ: linear in ln σ between neighbouring steps, clamped to
    [0, N − 1] (σ below σ_0 ≈ 0.01 or above σ_999 ≈ 157 is fed the end step)."""
    log_sigmas = log_sigmas.to(sigma.device)
    ls = torch.log(sigma.to(torch.float64))
    hi = torch.searchsorted(log_sigmas, ls).clamp(1, len(log_sigmas) - 1)
    lo = hi - 1
    frac = (ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    return (lo + frac).clamp(0, len(log_sigmas) - 1)


class DiscreteVPDenoiser(nn.Module):
    """D(x; σ) from a network predicting the noise ε on DDPM's discrete VP schedule (DiT):
    D = x − σ·ε̂(x/√(1 + σ²), t(σ)), since the EDM state x = y + σ·n is the VP state scaled by 1/√ᾱ with
    ᾱ = 1/(1 + σ²). t(σ) is :func:`ddpm_timestep`; the variance half of the output is dropped by ``_run``."""

    def __init__(self, net: nn.Module, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.net = net
        # A plain tensor, not a buffer: a bf16 conversion of the module must not round the schedule.
        self.log_sigmas = ddpm_log_sigmas(num_steps, beta_start, beta_end)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        t = ddpm_timestep(sigma, self.log_sigmas).to(sigma.dtype)
        s = expand_like(sigma, x)
        xf = x.to(s.dtype)
        eps = _run(self.net, (xf / torch.sqrt(1 + s ** 2)).to(x.dtype), t, class_labels=class_labels)
        return (xf - s * eps.to(s.dtype)).to(x.dtype)


class SiTVelocity(nn.Module):
    """v(z, t) from a SiT-clocked network: SiT's time s = 1 − t runs from noise (0) to data (1) and it predicts
    data − noise, so v(z, t) = −F(z; 1 − t) (the engine's z_t = (1 − t)·x + t·ε, v = ε − x)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        return -_run(self.net, z, 1 - _per_sample(t, z), class_labels=class_labels)


class SiTMeanFlowModel(MeanFlowModel):
    """u(z, r, t) from a SiT-clocked network with MeanFlow's r input: both times flipped, the output negated,
    so a SiT whose r-branch is zeroed (``zero_r_branch``) starts as exactly :class:`SiTVelocity` of it."""

    def forward(self, z: torch.Tensor, r, t, class_labels=None) -> torch.Tensor:
        return -_run(self.net, z, 1 - _per_sample(t, z), r_label=1 - _per_sample(r, z), class_labels=class_labels)
