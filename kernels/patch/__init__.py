"""Revertible patchers that route other code's calls to this package's kernels without editing it:
``patch_sdpa`` (a model's SDPA calls → the JVP-capable attention) and ``patch_dpm_solver_scheduler``
(diffusers' DPM-Solver++ update → the fused step). Each returns a handle with ``revert()``.
"""
