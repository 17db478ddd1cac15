"""What the teacher side of CMT mid-training hands the student side: pairs, and the teacher that made them.

:class:`CountedTeacher` is the one wrapper around a frozen teacher network: it applies classifier-free
guidance and counts every network evaluation as it happens, so each :class:`TrajectoryPairs` carries the
teacher work it cost by measurement, never by formula (a benchmark reports NFEs per pair from it).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch

from engine.formulas.guidance import guided


class CountedTeacher:
    """A frozen teacher as the rollout calls it, ``teacher(x, *times, labels)``, counting its evaluations.

    ``calls`` counts network invocations, ``nfe`` per-sample evaluations (Σ of each call's batch size).
    With ``cfg_scale`` ≠ 1 and labels, a call is one batched evaluation of [x; x] with [labels; null] and the
    guided combination of the two halves: 2 NFEs per sample (``null_class`` is the teacher's null label).
    With a ``guide`` network (EDM2's way, for teachers never trained with a dropped label) the second half is
    the guide's output instead, called with the labels when ``guide_labels`` (autoguidance by a weaker
    conditional model) or without (a separate unconditional model): also 2 NFEs per sample.
    """

    def __init__(self, net: Callable, cfg_scale: float = 1.0, null_class: Optional[int] = None,
                 guide: Optional[Callable] = None, guide_labels: bool = False):
        if cfg_scale != 1.0 and null_class is None and guide is None:
            raise ValueError("classifier-free guidance needs the teacher's null class or a guide network")
        self.net, self.cfg_scale, self.null_class = net, cfg_scale, null_class
        self.guide, self.guide_labels = guide, guide_labels
        self.calls = 0
        self.nfe = 0

    def __call__(self, x: torch.Tensor, *times_and_labels):
        *times, labels = times_and_labels
        if self.cfg_scale == 1.0 or labels is None:
            return self._evaluate(self.net, x, *times, labels)
        if self.guide is not None:
            cond = self._evaluate(self.net, x, *times, labels)
            return guided(cond, self._evaluate(self.guide, x, *times, labels if self.guide_labels else None),
                          self.cfg_scale)
        null = torch.full_like(labels, self.null_class)
        out = self._evaluate(self.net, torch.cat([x, x]), *(torch.cat([t, t]) for t in times),
                             torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return guided(cond, uncond, self.cfg_scale)

    def _evaluate(self, net: Callable, x: torch.Tensor, *args):
        self.calls += 1
        self.nfe += int(x.shape[0])
        return net(x, *args)


def counted(teacher: Callable) -> CountedTeacher:
    """``teacher`` itself if it is counted already, else wrapped once (unguided)."""
    return teacher if isinstance(teacher, CountedTeacher) else CountedTeacher(teacher)


@dataclass
class TrajectoryPairs:
    """Input–target pairs for the student, with where they came from and what they cost.

    ``t`` is the input's time: the EDM σ (consistency form) or the FM time
    (MeanFlow form, where ``r`` is the jump's end time). ``level`` is the grid index i of the input
    (t = t_i, t_0 the data end, t_N the start) and ``target_level`` that of the target (0 for the
    consistency form). ``trajectory`` numbers the rollout (or, for Slow CMT, the solve) a pair came from.
    """
    x: torch.Tensor                         # [P, C, H, W] student inputs
    t: torch.Tensor                         # [P] input time (σ for the consistency form)
    target: torch.Tensor                    # [P, C, H, W]
    level: torch.Tensor                     # [P] int64, grid index i of the input
    target_level: torch.Tensor              # [P] int64, grid index j of the target state
    trajectory: torch.Tensor                # [P] int64, which rollout / solve
    r: Optional[torch.Tensor] = None        # [P] MeanFlow only: the jump's end time t_j
    labels: Optional[torch.Tensor] = None   # [P] class labels, or None
    teacher_nfe: int = 0                    # counted per-sample teacher evaluations for these pairs
    teacher_calls: int = 0                  # counted teacher calls (batched network invocations)
    num_trajectories: int = 0               # rollouts (or solves) run

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "TrajectoryPairs":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)
