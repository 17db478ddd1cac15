"""Fused kernels for consistency-model training, usable without the rest of the engine.

Every op has a pure-PyTorch reference beside its fast path; ``kernels.dispatch`` chooses between them,
records which one ran, and lets a user force either.
"""

from kernels.dispatch import forced, implementations_run, last_implementation, set_policy

__all__ = ["forced", "implementations_run", "last_implementation", "set_policy"]
