"""Layer 2: samplers. Teacher ODE solvers (DPM-Solver++, EDM Euler/Heun, flow-matching Euler/Heun,
MeanFlow multistep) and few-step flow-map samplers, each a function of a model callable and tensors.

Imports the formulas and the kernels only; knows no network, config or trainer.
"""
