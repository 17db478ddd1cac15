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
    output back in ``x``'s dtype: callers keep their float32 data, noise and targets either way."""
    dtype = next(net.parameters()).dtype
    return net(x.to(dtype), *args, **kwargs).to(x.dtype)


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
    Defined for σ ≥ σ_min (c_noise = ¼ ln σ): a target at r = 0 is x_0 itself, chosen by the caller."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
        super().__init__(net, sigma_data)
        self.sigma_min = sigma_min

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        coeffs = consistency_precond_coeffs(sigma, self.sigma_data, self.sigma_min)
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
