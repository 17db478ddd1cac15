"""Fused kernels for consistency-model training, usable without the rest of the engine.

Every op has a pure-PyTorch reference beside its fast path; ``kernels.dispatch`` chooses between them,
records which one ran, and lets a user force either. The ops load on first use, so ``import kernels``
imports neither Triton nor the C++ extension.
"""

import importlib

from kernels.dispatch import forced, implementations_run, last_implementation, set_policy

_LAZY = {
    "dpm_solver_pp_step": "kernels.dpm_solver_step",
    "jvp_attention": "kernels.jvp_attention",
    "JVPAttention": "kernels.jvp_attention",
    "attention_jvp": "kernels.jvp_attention",
    "feature_distance": "kernels.feature_distance",
    "patch_dpm_solver_scheduler": "kernels.patch_diffusers",
    "patch_sdpa": "kernels.patch_sdpa",
}

__all__ = ["forced", "implementations_run", "last_implementation", "set_policy", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
