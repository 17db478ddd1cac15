"""The trainer: any stage, through DeepSpeed, resumable from one place. Progress is counted in images (kimg).

``Trainer(cfg, stage_name, run_dir)`` builds what a run needs, cheapest and most likely to fail first (the
data, the stage, then the process group and DeepSpeed); ``fit()`` is the loop, top to bottom. What a
micro-step trains on and with which seed is engine/trainer/batches.py; where a stage's prepared inputs are
made (in line, in a thread, on teacher ranks) engine/trainer/producers.py and teacher_ranks.py; what a
checkpoint holds and how a resume is verified engine/trainer/checkpoint.py; finiteness health.py; signals
signals.py. docs/reliability.md states what the loop guarantees across kills, signals and damage.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import torch

from engine.config import Config
from engine.data.dataset import build_training_data
from engine.errors import Stopped
from engine.stages import build_stage
from engine.trainer.batches import BatchPlan
from engine.trainer.checkpoint import Checkpoints, Progress
from engine.trainer.distributed import launch
from engine.trainer.health import Health
from engine.trainer.log import TrainingLog
from engine.trainer.producers import SerialProducer, ThreadedProducer, preparer
from engine.trainer.scoring import Scorer
from engine.trainer.signals import StopRequests
from engine.trainer.student import Student
from engine.trainer.teacher_ranks import receive_pairs, serve_teacher_rank
from kernels import dispatch


class Trainer:
    def __init__(self, cfg: Config, stage_name: str, run_dir: str | Path):
        self.cfg, self.stage_name, self.run_dir = cfg, stage_name, Path(run_dir)
        for op, impl in dataclasses.asdict(cfg.kernels).items():
            dispatch.set_policy(op, impl)
        # data.loader=torch: decoded into memory here; dali: decoded per batch, each rank only its share.
        self.dataset = build_training_data(cfg.data, cfg.network.num_classes)
        torch.manual_seed(cfg.train.seed)   # the initial weights are fixed by the seed
        self.stage = build_stage(stage_name, cfg)
        self.world = launch(self.stage.pipeline)
        self.batches = BatchPlan(self.dataset, cfg, self.world.students, self.world.device)
        self.stage.check_batch(self.batches.micro)
        self.stage.to(self.world.device)
        # A dedicated teacher rank only rolls the teacher out: no DeepSpeed, optimizer, EMA, checkpoints or logs.
        if self.world.role == "student":
            self.student = Student(self.stage.model, cfg, self.world, uses_jvp=bool(self.stage.uses_jvp))
            self.checkpoints = Checkpoints(self.run_dir, self.world, cfg.train.keep_checkpoints)
            # Missing detector weights or references fail now, not after the first hours of training.
            self.scorer = Scorer(cfg, stage_name, self.world) if cfg.train.eval_every_kimg > 0 else None

    def fit(self) -> Path:
        """Train until train.total_kimg, logging, snapshotting and checkpointing on the way; returns export/."""
        cfg, t, stage, world = self.cfg, self.cfg.train, self.stage, self.world
        if world.role == "teacher":
            serve_teacher_rank(stage, self.batches, world, t)
            return self.run_dir / "export"
        student, checkpoints = self.student, self.checkpoints
        try:
            tags = checkpoints.start(cfg, self.stage_name, stage.identity())
            client = checkpoints.resume(student, tags, len(self.dataset)) or {}
            progress = Progress(**client.get("progress", {}))
            stage.counters.update(client.get("counters", {}))
            log = TrainingLog(self.run_dir, world, t, self.stage_name, stage.pipeline is not None)
            log.start(progress, client.get("log"))
            health = Health(world, t.batch_size)
            total, last_tag = int(t.total_kimg * 1000), checkpoints.resumed_from
            next_log = _next_multiple(progress.nimg, t.log_every_kimg)
            next_snapshot = _next_multiple(progress.nimg, t.snapshot_every_kimg)
            next_checkpoint = _next_multiple(progress.nimg, t.checkpoint_every_kimg)
            next_eval = _next_multiple(progress.nimg, t.eval_every_kimg)

            with StopRequests(world) as stop, self._producer(progress.step) as produced:
                while progress.nimg < total:
                    grad_norm = None
                    for _ in range(t.grad_accum):
                        item = next(produced)
                        started = time.perf_counter()
                        loss, norm, kernels = self._train_on(item, progress.step + 1, health)
                        grad_norm = grad_norm if norm is None else norm
                        log.micro_step(loss, item.seconds, time.perf_counter() - started, kernels)
                    if t.nan_check == "before_step" and student.zero_stage > 0:
                        health.check()                         # ZeRO 1-3's norm exists after the update only
                    progress = Progress(progress.step + 1, progress.nimg + t.batch_size)
                    student.update_ema(progress.step)
                    log.step(grad_norm)
                    done, stopping = progress.nimg >= total, stop.agreed()

                    if progress.nimg >= next_log or done:
                        health.check()
                        log.write(progress, student.lr, stage.counters)
                        next_log = _next_multiple(progress.nimg, t.log_every_kimg)
                    if progress.nimg >= next_snapshot:
                        health.check()
                        if world.is_main:
                            student.export(self.run_dir / "snapshots" / snapshot_name(progress.nimg),
                                           self._meta(progress, None))
                        next_snapshot = _next_multiple(progress.nimg, t.snapshot_every_kimg)
                    if progress.nimg >= next_eval or (done and self.scorer is not None):
                        health.check()
                        log.write_eval(progress, self.scorer(student.ema_network(world.device)))
                        next_eval = _next_multiple(progress.nimg, t.eval_every_kimg)
                    if progress.nimg >= next_checkpoint or done or stopping:
                        health.check()
                        last_tag = self._checkpoint(progress, log)
                        next_checkpoint = _next_multiple(progress.nimg, t.checkpoint_every_kimg)
                    if stopping and not done:
                        raise Stopped(f"{_signal_name(stopping)} after step {progress.step} ({progress.kimg:g} kimg): "
                                      f"checkpoint {last_tag} written; run the same command to resume", stopping)
            log.close()
            self._export_final(progress, last_tag)
        finally:
            checkpoints.close()
        return self.run_dir / "export"

    def _train_on(self, item, step: int, health: Health):
        """One micro-step: the student's loss on the prepared inputs, its backward and, at the accumulation
        boundary, the update, checked first (train.nan_check=before_step) for anything non-finite.
        Returns (loss, the gradient norm at the boundary or None, the kernels this micro-step ran)."""
        student, grad_norm = self.student, None
        torch.manual_seed(item.job.seed ^ 1)   # dropout, and any other global-RNG draw of the student
        with dispatch.counting() as kernels:
            with student.forward() as model:
                loss = self.stage.loss(model, item.prepared)
                health.prepared(item.prepared, step)
                health.loss(loss, step)
                boundary = student.backward(loss)
            if boundary:
                grad_norm = student.grad_norm_before_step()      # ZeRO-0; None under ZeRO 1-3
                health.gradients(grad_norm, step)
                if self.cfg.train.nan_check == "before_step":
                    health.check()                             # before the update is applied
            if (zero_norm := student.step(boundary)) is not None:
                grad_norm = zero_norm
                health.gradients(grad_norm, step)
        return loss, grad_norm, item.kernels + kernels

    def _producer(self, first_step: int):
        """Where the stage's prepared inputs come from: in line, a thread ahead, or the teacher ranks."""
        world, pipeline = self.world, self.stage.pipeline
        if pipeline is not None and pipeline.mode == "teacher_ranks":
            return receive_pairs(self.stage, self.batches, world, first_step)
        jobs = self.batches.jobs(world.rank, first_step)
        make = preparer(self.stage, world.device)
        if pipeline is not None and pipeline.mode == "thread":
            return ThreadedProducer(jobs, make, depth=pipeline.depth, device=world.device,
                                    timeout_s=pipeline.timeout_s)
        return SerialProducer(jobs, make)

    def _checkpoint(self, progress: Progress, log: TrainingLog) -> str:
        """Write the checkpoint of ``progress`` and export its EMA (the export names the checkpoint)."""
        client = {"progress": dataclasses.asdict(progress), "ema": self.student.ema.state_dict(),
                  "data": {"num_items": len(self.dataset)}, "log": log.state_dict(),
                  "counters": dict(self.stage.counters)}
        tag = self.checkpoints.save(self.student, progress, client)
        if self.world.is_main:
            self.student.export(self.run_dir / "export", self._meta(progress, tag))
        torch.distributed.barrier()
        return tag

    def _export_final(self, progress: Progress, tag) -> None:
        """export/ must be made from the last checkpoint: a kill between the checkpoint and its export, or
        an earlier run's export, is re-made."""
        if self.world.is_main:
            meta = self.run_dir / "export" / "meta.json"
            made_from = json.loads(meta.read_text()).get("checkpoint") if meta.is_file() else None
            if made_from != tag or tag is None:
                self.student.export(self.run_dir / "export", self._meta(progress, tag))
        torch.distributed.barrier()

    def _meta(self, progress: Progress, checkpoint) -> dict:
        return {"stage": self.stage_name, "kimg": progress.kimg, "step": progress.step, "checkpoint": checkpoint}


def snapshot_name(nimg: int) -> str:
    """snapshots/ folder name of the EMA export after ``nimg`` images: kimg to the image, so names sort in
    training order and snapshots less than 0.1 kimg apart each get a folder of their own."""
    return f"kimg-{nimg / 1000:010.3f}"


def _next_multiple(nimg: int, every_kimg: float) -> float:
    """The first multiple of ``every_kimg`` (in images) above ``nimg``; never, for 0."""
    every = every_kimg * 1000
    if every <= 0:
        return float("inf")
    return (math.floor(nimg / every) + 1) * every


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name
