"""The CMT engine: pre-training, Consistency Mid-Training and post-training of few-step flow maps.

The subpackages are its layers, lowest first; a module imports only from lower layers (and its own
subpackage), never in a circle (tests/test_layout.py checks every import):

    errors, files, config   what every layer shares: user errors, atomic writes, the typed config tree
    formulas                the math: EDM and flow-matching formulas, grids, guidance, solver coefficients
    sampling, data          ODE solvers and few-step samplers; datasets, the sampler, DALI, SD-VAE latents
    models, losses          networks, their parameterisations and weight I/O; distances and feature nets
    stages, eval            pre/mid/post stages and the rollout into pairs; generation and metrics
    trainer                 DeepSpeed, ZeRO, producers, teacher ranks, checkpoints, logs, the planner
    cli                     the commands (cmt-train, cmt-sample, ...), one error handler
"""
