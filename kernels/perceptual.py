"""The (E)LatentLPIPS per-tap feature distance: one fused op (C++/CUDA) and its PyTorch reference.

For feature maps f0, f1 [B, C, H, W] and optional non-negative channel weights w [C]:

    d[b] = mean_{h,w} Σ_c w_c · (f0/(‖f0‖ + eps) − f1/(‖f1‖ + eps))²_{b,c,h,w}

with ‖·‖ the L2 norm over channels at each (b, h, w) (LPIPS's ``normalize_tensor``) and w_c = 1 without
weights. :func:`reference` is the single formula in pure PyTorch; :func:`feature_distance` runs the fused op
where it can (``kernels.dispatch`` op ``feature_distance``: ``cuda`` | ``cpp`` | ``torch``):

- ``auto``: the CUDA extension for CUDA tensors, the CPU extension for CPU tensors; the reference if that
  extension was not built (said once with a warning), or if ``weights`` needs a gradient (the fused ops
  differentiate f0 and f1 only: the perceptual heads are frozen).
- a forced implementation that cannot run (not built, wrong device, weights needing a gradient) raises.

The extensions (``kernels._C``: schemas + CPU kernels; ``kernels._cuda``: CUDA kernels) are built from csrc/
by ``pip install --no-build-isolation -e .``. They register ``torch.ops.cmt_csrc.feature_distance`` and
``feature_distance_backward``; this module makes the first differentiable (``torch.library.register_autograd``,
first-order only: the backward op has no derivative of its own) and gives both fake (meta) kernels.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

from kernels import dispatch

OP = "feature_distance"
_REBUILD = "build it with `pip install --no-build-isolation -e .` (see setup.py for the CMT_* build flags)"


# --------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------
def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """f / (‖f‖₂ over channels + eps) at every position. (vector_norm's gradient is 0, not NaN, at 0.)"""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


def _check(f0: torch.Tensor, f1: torch.Tensor, weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Shape checks shared by every implementation; returns the weights as [C] (LPIPS heads are [1,C,1,1])."""
    if f0.shape != f1.shape or f0.ndim != 4:
        raise ValueError(f"feature maps must share one [B, C, H, W] shape, got {tuple(f0.shape)} and {tuple(f1.shape)}")
    if weights is None:
        return None
    if weights.numel() != f0.shape[1]:
        raise ValueError(f"{weights.numel()} channel weights for {f0.shape[1]} channels")
    return weights.reshape(-1)


def reference(f0: torch.Tensor, f1: torch.Tensor, weights: Optional[torch.Tensor] = None,
              eps: float = 1e-10) -> torch.Tensor:
    """The distance [B] in plain PyTorch, computed in the inputs' dtype (the oracle for the fused op)."""
    weights = _check(f0, f1, weights)
    d = (unit_normalize(f0, eps) - unit_normalize(f1, eps)).square()
    if weights is not None:
        d = d * weights.reshape(1, -1, 1, 1).to(d.dtype)
    return d.sum(dim=1).mean(dim=(1, 2))


# --------------------------------------------------------------------------------------------------
# The extensions
# --------------------------------------------------------------------------------------------------
def _import(module: str) -> Optional[str]:
    """None if ``module`` imported, else why not."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as error:   # not built, or built against another torch
        return f"{module} did not import ({error})"


# kernels._C defines the op schemas, so the CUDA kernels can only register after it.
_UNAVAILABLE = {"cpp": _import("kernels._C")}
_UNAVAILABLE["cuda"] = _import("kernels._cuda") if _UNAVAILABLE["cpp"] is None else "kernels._C is missing"
_warned: set[str] = set()


def unavailable_reason(impl: str) -> Optional[str]:
    """None if the ``cpp`` / ``cuda`` extension is loaded, else why it is not."""
    return _UNAVAILABLE[impl]


if _UNAVAILABLE["cpp"] is None:
    def _setup_context(ctx, inputs, output):
        f0, f1, weight, eps = inputs
        ctx.save_for_backward(f0, f1, weight)
        ctx.eps = eps

    def _backward(ctx, grad):
        f0, f1, weight = ctx.saved_tensors
        g0, g1 = torch.ops.cmt_csrc.feature_distance_backward(grad, f0, f1, weight, ctx.eps,
                                                              ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return g0, g1, None, None

    torch.library.register_autograd("cmt_csrc::feature_distance", _backward, setup_context=_setup_context)

    @torch.library.register_fake("cmt_csrc::feature_distance")
    def _forward_fake(f0, f1, weight, eps):
        return f0.new_empty(f0.shape[0])

    @torch.library.register_fake("cmt_csrc::feature_distance_backward")
    def _backward_fake(grad, f0, f1, weight, eps, need_f0, need_f1):
        return (torch.empty_like(f0) if need_f0 else None, torch.empty_like(f1) if need_f1 else None)


# --------------------------------------------------------------------------------------------------
# The dispatched entry point
# --------------------------------------------------------------------------------------------------
def _choose(f0: torch.Tensor, weights: Optional[torch.Tensor]) -> str:
    policy = dispatch.policy(OP)
    if policy == "torch":
        return "torch"
    native = {"cuda": "cuda", "cpu": "cpp"}.get(f0.device.type)
    weights_need_grad = weights is not None and weights.requires_grad and torch.is_grad_enabled()
    if policy == dispatch.AUTO:
        if native is None or weights_need_grad:
            return "torch"
        if _UNAVAILABLE[native] is not None:
            if native not in _warned:
                _warned.add(native)
                warnings.warn(f"kernels.feature_distance: the {native} extension is unavailable "
                              f"({_UNAVAILABLE[native]}); using the PyTorch reference. To get it, {_REBUILD}.",
                              RuntimeWarning, stacklevel=3)
            return "torch"
        return native
    if native != policy:
        raise RuntimeError(f"feature_distance is forced to '{policy}' but the tensors are on {f0.device}: "
                           f"'{policy}' runs {'CUDA' if policy == 'cuda' else 'CPU'} tensors only")
    if _UNAVAILABLE[policy] is not None:
        raise RuntimeError(f"feature_distance is forced to '{policy}', which is unavailable: "
                           f"{_UNAVAILABLE[policy]}. To get it, {_REBUILD}; or use 'auto'/'torch'.")
    if weights_need_grad:
        raise RuntimeError(f"feature_distance is forced to '{policy}', but the weights require a gradient, "
                           "which the fused op does not compute: detach them or use 'torch'")
    return policy


def feature_distance(f0: torch.Tensor, f1: torch.Tensor, weights: Optional[torch.Tensor] = None,
                     eps: float = 1e-10) -> torch.Tensor:
    """Per-sample distance [B] between two feature maps [B, C, H, W] of one tap (see the module docstring).

    Differentiable in f0 and f1 (any of them may require grad); ``weights`` are C non-negative values of
    any shape, or None for a plain channel sum. Inputs: float32/float16/bfloat16/float64, any strides;
    the fused op accumulates in float32 (float64 for float64) and returns the inputs' dtype.
    """
    weights = _check(f0, f1, weights)
    impl = dispatch.record(OP, _choose(f0, weights))
    if impl == "torch":
        return reference(f0, f1, weights, eps)
    return torch.ops.cmt_csrc.feature_distance(f0, f1, weights, float(eps))
