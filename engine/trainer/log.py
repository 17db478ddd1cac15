"""What a run reports while it trains: one log.jsonl row per interval, a progress bar, finiteness checks.

Losses and gradient norms stay on the device until a row is written, so the host does not wait for the
device every step; a non-finite loss is noticed at the next row or checkpoint, with the step it appeared.
"""
from __future__ import annotations

import json
import sys
import time
import torch

from engine.config import TrainConfig
from engine.errors import DivergedError
from engine.trainer.checkpoint import Progress
from engine.trainer.distributed import World, mean_over_ranks
from kernels import dispatch


class TrainingLog:
    def __init__(self, run_dir, world: World, train: TrainConfig, progress: Progress, stage_name: str,
                 makes_pairs: bool, resumed: bool):
        self.path, self.world, self.train, self.makes_pairs = run_dir / "log.jsonl", world, train, makes_pairs
        self.micro = train.batch_size // (world.students * train.grad_accum)
        self.rate = "pairs/s" if makes_pairs else "img/s"
        self.bar = _progress_bar(world.is_main and train.progress, int(train.total_kimg * 1000), progress.nimg,
                                 f"{stage_name}{' (resumed)' if resumed else ''}")
        self._first_bad_step = None   # device tensor: the first step with a non-finite loss, or -1
        self._reset()

    def _reset(self) -> None:
        self.losses, self.grad_norms, self.tick = [], [], time.time()
        self.teacher_sec = self.student_sec = 0.0

    def micro_step(self, loss: torch.Tensor, step: int, teacher_sec: float, student_sec: float) -> None:
        loss = loss.detach()
        self.losses.append(loss)
        self.teacher_sec += teacher_sec
        self.student_sec += student_sec
        bad = torch.where(torch.isfinite(loss), -1, step)
        self._first_bad_step = bad if self._first_bad_step is None else \
            torch.where(self._first_bad_step >= 0, self._first_bad_step, bad)

    def step(self, grad_norm) -> None:
        self.grad_norms.append(grad_norm)
        self.bar.update(self.train.batch_size)

    def check_finite(self) -> None:
        """Raise on every rank if any rank's loss was not finite since the start (one host sync, collective:
        every rank calls it at the same steps)."""
        never = torch.iinfo(torch.int64).max
        first = torch.full((), never, dtype=torch.int64, device=self.world.device)
        if self._first_bad_step is not None:
            first = torch.where(self._first_bad_step >= 0, self._first_bad_step, first)
        if self.world.students > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        if int(first) != never:
            step = int(first)
            raise DivergedError(f"the loss became non-finite at step {step} (kimg "
                                f"{step * self.train.batch_size / 1000:.1f}): lower optim.lr or set optim.grad_clip")

    def write(self, progress: Progress, lr: float, counters: dict) -> None:
        """One row for the interval since the last: mean loss over ranks, lr, speed, gradient norm, counted
        work and the kernels used."""
        self.check_finite()
        mean_loss = mean_over_ranks(torch.stack(self.losses).mean())
        elapsed = time.time() - self.tick
        kimg_done = len(self.losses) * self.micro * self.world.students / 1000
        row = {"kimg": progress.kimg, "step": progress.step, "loss": mean_loss, "lr": lr,
               "sec_per_kimg": elapsed / max(kimg_done, 1e-9)}
        if self.makes_pairs:
            # this rank's seconds in the interval making pairs (in the producer thread when pipelined, so the
            # two may add up to more than the wall time) and training on them
            row.update(teacher_sec=self.teacher_sec, student_sec=self.student_sec)
        if self.grad_norms[-1] is not None:
            row["grad_norm"] = sum(float(n) for n in self.grad_norms) / len(self.grad_norms)
        row.update(counters)                                   # counted work (teacher NFEs, pairs, ...)
        row["kernels"] = dispatch.implementations_run()        # which implementation each op used
        if self.world.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(**{"loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}",
                                self.rate: f"{1000 * kimg_done / max(elapsed, 1e-9):.0f}"})
        self._reset()

    def close(self) -> None:
        self.bar.close()


class _NullBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress_bar(enabled: bool, total: int, start: int, desc: str):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=desc, unit="img", unit_scale=True, file=sys.stderr,
                mininterval=2.0, dynamic_ncols=True)
