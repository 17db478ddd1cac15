"""Layer 4: the training stages (pre, mid, post), each a :class:`engine.stages.base.Stage`, and the teacher
side of mid-training (rollouts into pairs). Framework-free: a stage knows no DeepSpeed, files or ranks.
"""
from __future__ import annotations

from engine.config import Config
from engine.errors import ConfigError
from engine.stages.base import Stage
from engine.stages.mid import MidTraining
from engine.stages.post import PostTraining
from engine.stages.pre import PreTraining

STAGES: dict[str, type[Stage]] = {"pre": PreTraining, "mid": MidTraining, "post": PostTraining}


def stage_class(name: str) -> type[Stage]:
    """The Stage subclass for ``name`` (pre, mid or post)."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}': choose {', '.join(STAGES)}")
    return STAGES[name]


def build_stage(name: str, cfg: Config) -> Stage:
    return stage_class(name)(cfg)
