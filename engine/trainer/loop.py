"""The trainer: any stage, through DeepSpeed, resumable from one place. Progress is counted in images (kimg).

``Trainer(cfg, stage_name, run_dir)`` builds what a run needs, cheapest and most likely to fail first (the
data, the stage, then the process group and DeepSpeed); ``fit()`` is the loop, top to bottom. What a
micro-step trains on and with which seed is engine/trainer/batches.py; where a stage's prepared inputs are
made (in line, in a thread, on teacher ranks) engine/trainer/producers.py and teacher_ranks.py; what a
checkpoint holds engine/trainer/checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from engine.config import Config
from engine.data.dataset import build_training_data
from engine.errors import ConfigError
from engine.stages import build_stage
from engine.trainer.batches import BatchPlan
from engine.trainer.checkpoint import Checkpoints, Progress
from engine.trainer.distributed import launch, zero_stage
from engine.trainer.log import TrainingLog
from engine.trainer.producers import SerialProducer, ThreadedProducer, preparer
from engine.trainer.student import Student
from engine.trainer.teacher_ranks import receive_pairs, serve_teacher_rank
from kernels import dispatch


class Trainer:
    def __init__(self, cfg: Config, stage_name: str, run_dir: str | Path):
        self.cfg, self.stage_name, self.run_dir = cfg, stage_name, Path(run_dir)
        for op, impl in dataclasses.asdict(cfg.kernels).items():
            dispatch.set_policy(op, impl)
        # data.loader=torch: decoded into memory here; dali: decoded per batch, each rank only its share.
        self.dataset = build_training_data(cfg.data)
        torch.manual_seed(cfg.train.seed)   # the initial weights are fixed by the seed
        self.stage = build_stage(stage_name, cfg)
        if self.stage.uses_jvp and zero_stage(cfg) == 3:
            raise ConfigError(f"{self.stage.uses_jvp} differentiates the network with torch.func.jvp, which cannot "
                              "trace through ZeRO-3's parameter gathering: use ZeRO 0, 1 or 2 (train.zero_stage, or "
                              "another train.deepspeed_config); ZeRO-2 already shards gradients and optimizer state")
        self.world = launch(self.stage.pipeline)
        self.batches = BatchPlan(self.dataset, cfg, self.world.students, self.world.device)
        self.stage.check_batch(self.batches.micro)
        self.stage.to(self.world.device)
        # A dedicated teacher rank only rolls the teacher out: no DeepSpeed, optimizer, EMA, checkpoints or logs.
        if self.world.role == "student":
            self.student = Student(self.stage.model, cfg, self.world)
            self.checkpoints = Checkpoints(self.run_dir, self.world, cfg.train.keep_checkpoints)

    def fit(self) -> Path:
        """Train until train.total_kimg, logging, snapshotting and checkpointing on the way; returns export/."""
        cfg, t, stage, world = self.cfg, self.cfg.train, self.stage, self.world
        if world.role == "teacher":
            serve_teacher_rank(stage, self.batches, world, t)
            return self.run_dir / "export"
        student = self.student
        self.checkpoints.start(cfg)
        progress = self.checkpoints.resume(student, len(self.dataset))
        resumed, progress = progress is not None, progress or Progress()
        log = TrainingLog(self.run_dir, world, t, progress, self.stage_name, stage.pipeline is not None, resumed)
        total = int(t.total_kimg * 1000)
        next_log = _next_multiple(progress.nimg, t.log_every_kimg)
        next_snapshot = _next_multiple(progress.nimg, t.snapshot_every_kimg)
        next_checkpoint = _next_multiple(progress.nimg, t.checkpoint_every_kimg)

        with self._producer(progress.step) as produced:
            while progress.nimg < total:
                for _ in range(t.grad_accum):
                    item = next(produced)
                    started = time.perf_counter()
                    torch.manual_seed(item.job.seed ^ 1)   # dropout, and any other global-RNG draw of the student
                    loss = stage.loss(student.engine, item.prepared)
                    grad_norm = student.backward_and_step(loss)
                    log.micro_step(loss, progress.step, item.seconds, time.perf_counter() - started)
                progress = Progress(progress.step + 1, progress.nimg + t.batch_size)
                student.update_ema(progress.step)
                log.step(grad_norm)
                done = progress.nimg >= total

                if progress.nimg >= next_log or done:
                    log.write(progress, student.lr, stage.counters)
                    next_log = _next_multiple(progress.nimg, t.log_every_kimg)
                if progress.nimg >= next_snapshot:
                    log.check_finite()
                    if world.is_main:
                        student.export(self.run_dir / "snapshots" / f"kimg-{progress.kimg:08.1f}", self._meta(progress))
                    next_snapshot = _next_multiple(progress.nimg, t.snapshot_every_kimg)
                if progress.nimg >= next_checkpoint or done:
                    log.check_finite()
                    self.checkpoints.save(student, progress, len(self.dataset), self._meta(progress))
                    next_checkpoint = _next_multiple(progress.nimg, t.checkpoint_every_kimg)
        log.close()

        if world.is_main and not (self.run_dir / "export").is_dir():
            student.export(self.run_dir / "export", self._meta(progress))
        torch.distributed.barrier()
        return self.run_dir / "export"

    def _producer(self, first_step: int):
        """Where the stage's prepared inputs come from: in line, a thread ahead, or the teacher ranks."""
        world, pipeline = self.world, self.stage.pipeline
        if pipeline is not None and pipeline.mode == "teacher_ranks":
            return receive_pairs(self.stage, self.batches, world, first_step)
        jobs = self.batches.jobs(world.rank, first_step)
        make = preparer(self.stage, world.device)
        if pipeline is not None and pipeline.mode == "thread":
            return ThreadedProducer(jobs, make, depth=pipeline.depth, device=world.device)
        return SerialProducer(jobs, make)

    def _meta(self, progress: Progress) -> dict:
        return {"stage": self.stage_name, "kimg": progress.kimg, "step": progress.step}


def _next_multiple(nimg: int, every_kimg: float) -> float:
    """The first multiple of ``every_kimg`` (in images) above ``nimg``; never, for 0."""
    every = every_kimg * 1000
    if every <= 0:
        return float("inf")
    return (math.floor(nimg / every) + 1) * every
