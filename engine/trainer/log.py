"""What a run reports while it trains: one log.jsonl row per interval, the same values as TensorBoard
scalars (RUN/tensorboard, ``tensorboard --logdir runs/``), and a progress bar.

Losses and gradient norms stay on the device until a row is written, so the host does not wait for the
device every step. The open interval (the losses since the last row), the kernels counted and the stage's
counters travel in each checkpoint, so the first row after a resume is the row an uninterrupted run writes.
On every start the log is cut back to the step the run starts from (nothing, for a fresh run), dropping a
line a kill left half written; TensorBoard's events from that step on are purged the same way. Scores
(train.eval_every_kimg) are rows of their own: ``{"kimg", "step", "eval": {...}}``.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

import torch

from engine.config import TrainConfig
from engine.eval.protocol import METRICS
from engine.files import write_text_atomically
from engine.trainer.checkpoint import Progress
from engine.trainer.distributed import World, mean_over_ranks


class TrainingLog:
    def __init__(self, run_dir, world: World, train: TrainConfig, stage_name: str, makes_pairs: bool):
        self.path, self.world, self.train, self.makes_pairs = run_dir / "log.jsonl", world, train, makes_pairs
        self.stage_name = stage_name
        self.micro = train.batch_size // (world.students * train.grad_accum)
        self.rate = "pairs/s" if makes_pairs else "img/s"
        self.kernels = Counter()   # implementations every step so far ran ({"op:impl": calls}), in every process
        self.bar = self.board = None
        self._reset()

    def _reset(self) -> None:
        self.losses, self.grad_norms, self.tick = [], [], time.time()
        self.teacher_sec = self.student_sec = 0.0

    def start(self, progress: Progress, saved: dict | None) -> None:
        """Cut log.jsonl back to ``progress`` and take up the interval a checkpoint left open (``saved``)."""
        if saved:
            self.losses = [torch.tensor(v, device=self.world.device) for v in saved["losses"]]
            self.grad_norms = list(saved["grad_norms"])
            self.kernels = Counter(saved["kernels"])
        if self.world.is_main:
            kept = []
            if self.path.is_file():
                for line in self.path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= progress.step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        break   # a half-written last line (or anything after it)
            write_text_atomically(self.path, "".join(line + "\n" for line in kept))
        enabled = self.world.is_main and self.train.progress
        self.bar = _progress_bar(enabled, int(self.train.total_kimg * 1000), progress.nimg,
                                 f"{self.stage_name}{' (resumed)' if progress.step else ''}")
        if self.world.is_main and self.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # global step = images seen (progress is counted in images); a resume hides what came after it
            self.board = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=progress.nimg + 1)

    def state_dict(self) -> dict:
        """The open interval, for a checkpoint (one host sync)."""
        return {"losses": [float(v) for v in self.losses], "kernels": dict(self.kernels),
                "grad_norms": [None if n is None else float(n) for n in self.grad_norms]}

    def micro_step(self, loss: torch.Tensor, teacher_sec: float, student_sec: float, kernels: Counter) -> None:
        """One micro-step's loss, seconds and kernels (its prepared inputs' and its student's)."""
        self.losses.append(loss.detach())
        self.teacher_sec += teacher_sec
        self.student_sec += student_sec
        self.kernels.update(kernels)

    def step(self, grad_norm) -> None:
        self.grad_norms.append(grad_norm)
        self.bar.update(self.train.batch_size)

    def write(self, progress: Progress, lr: float, counters: dict) -> None:
        """One row for the interval since the last: mean loss over ranks, lr, speed, gradient norm, counted
        work and the kernels used."""
        mean_loss = mean_over_ranks(torch.stack(self.losses).mean())
        elapsed = time.time() - self.tick
        kimg_done = len(self.losses) * self.micro * self.world.students / 1000
        row = {"kimg": progress.kimg, "step": progress.step, "loss": mean_loss, "lr": lr,
               "sec_per_kimg": elapsed / max(kimg_done, 1e-9)}
        if self.makes_pairs:
            # this rank's seconds in the interval making pairs (in the producer thread when pipelined, so the
            # two may add up to more than the wall time) and training on them
            row.update(teacher_sec=self.teacher_sec, student_sec=self.student_sec)
        if self.grad_norms and self.grad_norms[-1] is not None:
            row["grad_norm"] = sum(float(n) for n in self.grad_norms) / len(self.grad_norms)
        row.update(counters)                                   # counted work (teacher NFEs, pairs, ...)
        row["kernels"] = dict(sorted(self.kernels.items()))   # which implementation each op used
        self._append(row, progress)
        self.bar.set_postfix(**{"loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}",
                                self.rate: f"{1000 * kimg_done / max(elapsed, 1e-9):.0f}"})
        self._reset()

    def write_eval(self, progress: Progress, results: dict) -> None:
        """A row with the scores of the EMA network at ``progress`` (rank 0 holds them)."""
        if self.world.is_main:
            self._append({"kimg": progress.kimg, "step": progress.step, "eval": results}, progress)

    def _append(self, row: dict, progress: Progress) -> None:
        if not self.world.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for tag, value in _scalars(row, self.rate):
                self.board.add_scalar(tag, value, progress.nimg)
            self.board.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()


def _scalars(row: dict, rate: str):
    """(tag, value) of a log row's numbers, as TensorBoard shows them: train/*, work/* (counted), eval/*."""
    if "eval" in row:
        yield from ((f"eval/{k}", v) for k, v in row["eval"].items() if k in METRICS)
        return
    for key in ("loss", "lr", "grad_norm", "sec_per_kimg", "teacher_sec", "student_sec"):
        if key in row:
            yield f"train/{key}", row[key]
    yield f"train/{rate.replace('/', '_per_')}", 1000 / max(row["sec_per_kimg"], 1e-9)
    for key, value in row.items():
        if key not in ("kimg", "step", "loss", "lr", "grad_norm", "sec_per_kimg", "teacher_sec", "student_sec",
                       "kernels") and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"work/{key}", value


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
