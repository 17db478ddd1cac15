"""Fused kernels for consistency-model training, usable without the rest of the engine.

Every op has a pure-PyTorch reference beside its fast path; ``kernels.dispatch`` chooses between them,
records which one ran, and lets a user force either. The ops load on first use, so ``import kernels``
imports neither Triton nor the C++ extension. No submodule shares a name with what it exports, so
``from kernels import jvp_attention`` is always the function. This package never imports ``engine``.
"""

import importlib

from kernels.dispatch import forced, implementations_run, last_implementation, set_policy

# name -> the module that defines it (documented there)
_LAZY = {
    "dpm_solver_pp_step": "kernels.dpm_solver_step",
    "scaled_dot_product_attention": "kernels.attention",
    "jvp_attention": "kernels.attention",
    "JVPAttention": "kernels.attention",
    "attention_jvp": "kernels.attention",
    "feature_distance": "kernels.perceptual",
    "patch_dpm_solver_scheduler": "kernels.patch.dpm_solver_scheduler",
    "patch_sdpa": "kernels.patch.sdpa",
}

__all__ = ["forced", "implementations_run", "last_implementation", "set_policy", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
