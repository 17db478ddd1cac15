"""Where a non-finite number first appeared — the step's prepared inputs (a teacher's pairs, the noise),
the student's loss, or its gradients — found before it can reach a checkpoint or an export.

Flags stay on the device (the first bad step of each kind) and :meth:`Health.check` reads them in one host
sync. With ``train.nan_check=before_step`` the trainer checks at every optimizer step, before the update is
applied (after it too under ZeRO 1-3, whose gradient norm only exists then, and always before the EMA);
with ``deferred`` only at log rows, snapshots and checkpoints, which spares the per-step sync: the weights
in memory may then hold a diverged step, but no file ever does.
"""
from __future__ import annotations

import dataclasses

import torch

from engine.errors import DivergedError
from engine.trainer.distributed import World

KINDS = ("prepared inputs", "loss", "gradients")
HINTS = {
    "prepared inputs": "the teacher's pairs (or the step's noise) hold NaN/Inf: check the teacher (mid.teacher, "
                       "post.teacher), whose export may have diverged or be damaged",
    "loss": "lower optim.lr or set optim.grad_clip",
    "gradients": "lower optim.lr or set optim.grad_clip",
}
_NEVER = torch.iinfo(torch.int64).max


class Health:
    def __init__(self, world: World, batch_size: int):
        self.world, self.batch_size = world, batch_size
        self.first_bad = torch.full((len(KINDS),), _NEVER, dtype=torch.int64, device=world.device)

    def _note(self, kind: str, finite: torch.Tensor, step: int) -> None:
        k = KINDS.index(kind)
        bad_at = torch.where(finite, _NEVER, step).to(self.first_bad)
        self.first_bad[k] = torch.minimum(self.first_bad[k], bad_at)

    def prepared(self, prepared, step: int) -> None:
        tensors = [v for v in vars(prepared).values() if isinstance(v, torch.Tensor) and v.is_floating_point()] \
            if dataclasses.is_dataclass(prepared) else []
        if tensors:
            self._note("prepared inputs", torch.stack([torch.isfinite(t).all() for t in tensors]).all(), step)

    def loss(self, loss: torch.Tensor, step: int) -> None:
        self._note("loss", torch.isfinite(loss.detach()), step)

    def gradients(self, norm, step: int) -> None:
        if norm is not None:
            self._note("gradients", torch.isfinite(torch.as_tensor(norm, device=self.world.device)), step)

    def check(self) -> None:
        """Raise on every rank if any rank saw a non-finite number (collective: every rank calls it at the same
        steps); the message names the earliest step and what became non-finite there."""
        first = self.first_bad.clone()
        if self.world.students > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = first.tolist()
        if min(first) == _NEVER:
            return
        step = min(first)
        kind = KINDS[first.index(step)]
        raise DivergedError(f"the {kind} became non-finite at step {step} (kimg {step * self.batch_size / 1000:g}), "
                            f"before any checkpoint or export held it: {HINTS[kind]}")
