"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""
import torch


def randomize_(module, std=0.2, seed=0):
    """Zero-initialised residual branches, gates and output layers hide most of a network at init:
    give every parameter seeded random values so tests see the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module
