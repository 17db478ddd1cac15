"""The work of every micro-step: which images, which seed. A pure function of (step, micro-step, rank).

Randomness is placement-free. A step's global batch is cut into ``grad_accum × ranks`` chunks, micro-step m
of rank r taking chunk c = m·ranks + r, images step·batch + c·micro … of the sampler's stream. Every random
draw for a chunk (noise, the teacher's rollout, dropout, augmentation) comes from ``step_seed(seed, step,
c)``: the generator handed to the stage's ``prepare``, and the global RNG the trainer reseeds before the
student's forward. So one process with grad_accum=2 computes exactly the chunks two processes with
grad_accum=1 compute, and nothing random is carried from one step to the next: a checkpoint needs the
model, optimizer, EMA, lr schedule and progress, but no RNG or sampler state (python ``random`` and numpy's
global RNG are not used at all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from engine.config import Config
from engine.data.sampler import InfiniteSampler
from engine.trainer.distributed import micro_batch_size


def step_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit seed for one chunk of one step's global batch: a resumed or re-placed run draws the same numbers."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + chunk * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@dataclass
class MicroJob:
    """What one micro-step of one rank needs: which step it belongs to, its seed and its batch (None where
    another rank makes what the batch is for)."""
    step: int
    micro: int
    seed: int
    batch: Optional[dict]


class BatchPlan:
    """Every rank's micro-batches: ``job(step, micro, rank)`` for any of them, from the dataset and the seed."""

    def __init__(self, dataset, cfg: Config, students: int, device: torch.device):
        t = cfg.train
        self.dataset, self.device, self.students = dataset, device, students
        self.batch_size, self.grad_accum, self.seed = t.batch_size, t.grad_accum, t.seed
        self.micro = micro_batch_size(t, students)
        self.labeled = cfg.network.num_classes > 0
        self.sampler = InfiniteSampler(len(dataset), seed=t.seed, random_flip=cfg.data.xflip)

    def batch(self, step: int, chunk: int) -> dict:
        """Chunk ``chunk`` of step ``step``'s global batch, on the device: {"images", optional "labels"}."""
        sampled = self.sampler.draw(step * self.batch_size + chunk * self.micro, self.micro)
        images, labels = self.dataset.gather(sampled.indices, sampled.flip)
        batch = {"images": images.to(self.device)}
        if self.labeled:
            batch["labels"] = labels.to(self.device)
        return batch

    def job(self, step: int, micro: int, rank: int, with_batch: bool = True) -> MicroJob:
        chunk = micro * self.students + rank
        return MicroJob(step, micro, step_seed(self.seed, step, chunk),
                        self.batch(step, chunk) if with_batch else None)

    def jobs(self, rank: int, first_step: int, last_step: Optional[int] = None,
             with_batch: bool = True) -> Iterator[MicroJob]:
        """Rank ``rank``'s micro-steps from ``first_step`` on (to ``last_step``, exclusive), in training order."""
        step = first_step
        while last_step is None or step < last_step:
            for m in range(self.grad_accum):
                yield self.job(step, m, rank, with_batch)
            step += 1
