"""Per-sample scalars (times, noise levels, coefficients) against a batch: the one broadcast helper."""
from __future__ import annotations

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half and float32 tensors, float64 for float64: arithmetic never runs below float32."""
    return torch.promote_types(x.dtype, torch.float32)


def per_sample(value, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A float, 0-d or [B] ``value`` as a [B] tensor on ``x``'s device (B = x.shape[0]), in ``dtype`` if given."""
    value = torch.as_tensor(value, device=x.device)
    if dtype is not None:
        value = value.to(dtype)
    if value.ndim == 0:
        value = value.expand(x.shape[0])
    if value.shape != (x.shape[0],):
        raise ValueError(f"expected a per-sample value of shape [{x.shape[0]}], got {tuple(value.shape)}")
    return value


def expand_like(value, x: torch.Tensor) -> torch.Tensor:
    """A float, 0-d or [B] ``value`` shaped to multiply ``x`` sample by sample: 0-d stays 0-d, [B] becomes
    [B, 1, ..., 1]."""
    value = torch.as_tensor(value, device=x.device)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != x.shape[0]:
        raise ValueError(f"expected a per-sample tensor of shape [{x.shape[0]}], got {tuple(value.shape)}")
    return value.reshape(-1, *([1] * (x.ndim - 1)))
