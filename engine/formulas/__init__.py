"""Layer 1, the math: EDM and flow-matching formulas, time grids, guidance, solver coefficients.

Pure functions of tensors and numbers. Nothing here imports a network, a config, DeepSpeed or a file;
the kernels in ``kernels/`` are checked against these formulas, never against a second copy of them.
"""
