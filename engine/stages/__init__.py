"""Training stages: each turns a batch into a loss and knows nothing of DeepSpeed or files.

A stage owns `model` (the module the trainer optimises and keeps an EMA of) and implements
`loss(model, batch, generator)`, where `model` is whatever callable the trainer hands it (the DeepSpeed
engine wrapping `stage.model`), `batch` a dict with "images" and optional "labels", and `generator` the
step's seeded RNG for noise — so a step's randomness is fixed by (seed, step, rank) alone.
"""
from __future__ import annotations

from engine.config import Config


def build_stage(name: str, cfg: Config):
    if name == "pre":
        from engine.stages.pre import PreTraining
        return PreTraining(cfg)
    if name == "mid":
        from engine.stages.mid import MidTraining
        return MidTraining(cfg)
    if name == "post":
        from engine.stages.post import PostTraining
        return PostTraining(cfg)
    raise ValueError(f"unknown stage '{name}': choose pre, mid or post")
