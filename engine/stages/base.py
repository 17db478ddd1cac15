"""The stage protocol: what the trainer knows of a stage, and all it knows.

A stage turns a batch into a loss in two halves, so the trainer can run the first ahead of the second:

- ``prepare(batch, generator)`` — everything the student takes no part in, under no_grad: the step's random
  draws (from ``generator`` only, never the global RNG) and a frozen teacher's work. For a stage with a
  :class:`Pipeline` the result depends on nothing but the arguments, so it can be made in another thread or
  on another rank, ahead of the student.
- ``loss(model, prepared)`` — the student's forward(s) and the loss. ``model`` is the DeepSpeed engine
  around ``stage.model``; dropout draws from the global RNG, which the trainer seeds per micro-step.

A stage knows no DeepSpeed, files or ranks. It owns ``model`` (what the trainer optimises, keeps an EMA of
and exports) and keeps frozen networks (a teacher, a perceptual net) outside it, so DeepSpeed neither
optimises nor checkpoints them. ``counters`` is the work it counted, logged beside the loss.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from engine.config import Config
from engine.errors import ConfigError


@dataclass(frozen=True)
class Pipeline:
    """How a stage's ``prepare`` may be scheduled (docs/scale-out.md): ``serial`` in line, ``thread`` in a
    background thread up to ``depth`` micro-steps ahead, ``teacher_ranks`` on ``teacher_ranks`` dedicated
    ranks. The same pairs and losses either way."""
    mode: str = "serial"
    depth: int = 2
    teacher_ranks: int = 1
    timeout_s: float = 1800.0    # a producer that delivers nothing for this long stops training


@dataclass(frozen=True)
class PairCost:
    """Network evaluations one training pair (one image for pre/post) costs, by formula (docs/method.md §8).
    The stages count the same work as it happens; a test checks the two agree."""
    teacher_nfe: float
    student_grad: float      # student forwards with autograd (a MeanFlow jvp counts as two)
    student_nograd: float    # student forwards without autograd (targets, guidance)
    distance: str            # engine.losses.distances.build_distance kind
    jvp: float = 0.0         # of the forwards with autograd, torch.func.jvp calls (each counted as two above)


class Stage(ABC):
    """Base class of the three stages; see the module docstring for the protocol."""

    name: ClassVar[str]
    # Type of what ``prepare`` returns: a dataclass of tensors and numbers, which teacher ranks send.
    prepared_type: ClassVar[type]
    # The setting that makes the loss differentiate the model with torch.func.jvp, e.g. "post.method=meanflow";
    # None when it does not. Under ZeRO-3 the trainer runs such a loss on gathered parameters (Student.forward).
    uses_jvp: Optional[str] = None

    model: nn.Module
    counters: dict[str, int]
    # None: ``prepare`` runs in line (it is cheap, or shares state with ``loss``).
    pipeline: Optional[Pipeline] = None

    @staticmethod
    @abstractmethod
    def cost_per_pair(cfg: Config) -> PairCost:
        """What a pair costs for this config, without building anything (engine.trainer.plan uses it)."""

    def to(self, device: torch.device) -> "Stage":
        """Move the frozen networks the stage keeps outside ``model`` (once, before training)."""
        return self

    def check_batch(self, micro_batch: int) -> None:
        """Refuse a per-rank micro-batch this stage cannot split (checked once, before training)."""

    def identity(self) -> dict[str, str]:
        """The files this stage reads besides the config (a teacher's export, a feature net), by config key,
        as content hashes: recorded in every checkpoint, so a resume notices when one was replaced."""
        return {}

    @abstractmethod
    def prepare(self, batch: dict, generator: torch.Generator) -> Any:
        ...

    @abstractmethod
    def loss(self, model, prepared: Any) -> torch.Tensor:
        ...


def check_label_dropout(p: float, num_classes: int, key: str) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{key}={p} must be in [0, 1)")
    if p > 0.0 and num_classes == 0:
        raise ConfigError(f"{key}={p} needs a class-conditional network: set network.num_classes or {key}=0")
