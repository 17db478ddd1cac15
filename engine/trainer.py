"""The DeepSpeed trainer: runs any stage the same way, resumable from one place.

Progress is counted in images (kimg), as in EDM.

Randomness is placement-free. A step's global batch is cut into ``grad_accum × world`` chunks, micro-step m
of rank r taking chunk c = m·world + r (the sampler draws ``batch/grad_accum`` images per micro-step and rank
r keeps slice r). Every random draw for a chunk (noise, the teacher's rollout, dropout, augmentation) comes
from ``step_seed(seed, step, c)``: the generator handed to the stage, and the global RNG reseeded before the
student's forward. So one process with grad_accum=2 computes exactly the chunks two processes with
grad_accum=1 compute, and nothing random is carried from one step to the next: a checkpoint needs the
model, optimizer, EMA, lr schedule, progress and sampler position, but no RNG state (python ``random`` and
numpy's global RNG are not used at all; tests/test_resume_mid.py checks a resume is bit-identical).

Mid-training makes its pairs through engine/pipeline.py: in line (``mid.pipeline=serial``), in a background
thread running ahead of the student (``thread``), or on dedicated teacher ranks (``teacher_ranks``, see
init_teacher_ranks), with the same pairs and losses either way.
ZeRO-3 shards the parameters: the EMA update gathers them (deepspeed.zero.GatheredParameters), and the
EMA is exported through a copy of the network taken before DeepSpeed partitioned it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from engine.config import Config, ConfigError, save_config, to_dict
from engine.data import InfiniteSampler, build_training_data
from engine.export import export_network
from engine.pipeline import (MSG_START, MicroJob, RemoteProducer, SerialProducer, ThreadedProducer, recv_message,
                             send_message, serve_pairs)
from engine.stages import build_stage
from kernels import dispatch as kernel_dispatch


# --------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; a plain `python` launch becomes a world of one.

    On a machine without CUDA, DeepSpeed's CPU accelerator is selected (it falls back to gloo).
    Returns (rank, world_size).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


@dataclass
class Placement:
    """Where this process sits when mid.pipeline=teacher_ranks splits the launched world."""
    role: str          # "student" or "teacher"
    rank: int          # global rank: students are 0..students-1, teachers students..world-1
    students: int
    teachers: int
    pairs: object      # gloo process group over all launched ranks, for the pairs (point to point only)


def init_teacher_ranks(teachers: int) -> Placement:
    """Split the launched world (torchrun's RANK/WORLD_SIZE) into student ranks and ``teachers`` teacher ranks.

    The student ranks form torch.distributed's default group, so DeepSpeed (which calls barriers on the
    default group, e.g. in save_checkpoint) and the trainer's own collectives see the students only, and
    RANK/WORLD_SIZE are rewritten to the student world. Teacher ranks join no default group. All ranks join
    a separate gloo group for the pairs (engine/pipeline.py). Both come from one env:// rendezvous store.
    """
    import datetime

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if not 1 <= teachers < world:
        raise ConfigError(f"mid.pipeline=teacher_ranks with mid.teacher_ranks={teachers} needs at least "
                          f"{teachers + 1} launched processes and one of them a student, got {world}: launch more "
                          "(torchrun --nproc_per_node) or use mid.pipeline=thread")
    if torch.distributed.is_initialized():
        raise RuntimeError("mid.pipeline=teacher_ranks must split the world before torch.distributed starts")
    store, _, _ = next(torch.distributed.rendezvous("env://", rank=rank, world_size=world))
    students = world - teachers
    pairs = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("cmt-pairs/", store), rank, world,
                                               datetime.timedelta(minutes=30))
    if rank >= students:
        return Placement("teacher", rank, students, teachers, pairs)
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(students))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore("cmt-students/", store),
                                         rank=rank, world_size=students)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)   # adopts the student group
    return Placement("student", rank, students, teachers, pairs)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run: a user file if named, else built from train.*."""
    t = cfg.train
    ds = _base_deepspeed_config(cfg)
    micro = t.batch_size // (world_size * t.grad_accum)
    if micro * world_size * t.grad_accum != t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by world size ({world_size}) "
                          f"x train.grad_accum ({t.grad_accum})")
    ds.update(train_batch_size=t.batch_size, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=t.grad_accum, steps_per_print=2**62, wall_clock_breakdown=False)
    # Always explicit: DeepSpeed's own default clips at 1.0, which would silently change "0 = off".
    ds["gradient_clipping"] = cfg.optim.grad_clip
    # DeepSpeed vets client optimizers for ZeRO by class and knows only Adam/AdamW. ZeRO hands the optimizer
    # flat shards of the parameters, which is right for any elementwise update: RAdam (optim.name) is one.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _base_deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config '{path}' does not exist: use a file from configs/deepspeed/")
        return json.loads(path.read_text())
    ds = {"zero_optimization": {"stage": t.zero_stage}}
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage this run will use (from train.deepspeed_config if set, else train.zero_stage)."""
    return int(_base_deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0))


def check_scale_out(cfg: Config, stage_name: str) -> None:
    """Refuse combinations that cannot work, before any process group starts."""
    if stage_name == "post" and cfg.post.method == "meanflow" and zero_stage(cfg) == 3:
        raise ConfigError("post.method=meanflow differentiates the network with torch.func.jvp, which cannot "
                          "trace through ZeRO-3's parameter gathering: use ZeRO 0, 1 or 2 (train.zero_stage, or "
                          "another train.deepspeed_config); ZeRO-2 already shards gradients and optimizer state")
    if stage_name == "mid" and cfg.mid.pipeline_depth < 1:
        raise ConfigError(f"mid.pipeline_depth={cfg.mid.pipeline_depth}: the producer must be allowed at least "
                          "one micro-batch ahead, set it to 1 or more")
    if stage_name == "mid" and cfg.mid.pipeline == "teacher_ranks" and cfg.mid.teacher_ranks < 1:
        raise ConfigError(f"mid.teacher_ranks={cfg.mid.teacher_ranks}: mid.pipeline=teacher_ranks needs 1 or more")


# --------------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, chunk: int) -> int:
    """A 63-bit seed for one chunk of one step's global batch: a resumed or re-placed run draws the same numbers."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + chunk * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers), kept in fp32.

    Whole on every rank, also under ZeRO-3: the trainer gathers the sharded parameters for the update.
    """

    def __init__(self, module: torch.nn.Module, beta: float, warmup: bool):
        self.beta, self.warmup = beta, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def beta_at(self, step: int) -> float:
        return min(self.beta, (1 + step) / (10 + step)) if self.warmup else self.beta

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        beta = self.beta_at(step)
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1.0 - beta)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


def lr_factor(cfg: Config, nimg: int) -> float:
    o, total = cfg.optim, cfg.train.total_kimg * 1000
    f = 1.0
    if o.warmup_kimg > 0:
        f = min(1.0, nimg / (o.warmup_kimg * 1000))
    if o.schedule == "linear":
        f *= max(0.0, 1.0 - nimg / total)
    return f


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[o.name]
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@dataclass
class Progress:
    step: int = 0
    nimg: int = 0


CHANGEABLE_ON_RESUME = {"train.total_kimg", "train.progress", "train.checkpoint_every_kimg",
                        "train.log_every_kimg", "train.snapshot_every_kimg", "train.keep_checkpoints",
                        "sample", "eval", "data.loader",   # torch and dali give the same batches
                        "mid.pipeline", "mid.pipeline_depth", "mid.teacher_ranks"}   # where pairs are made, not which


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict, cfg: Config) -> None:
    """Refuse to resume a run dir with a different recipe: that would silently mix two runs."""
    a, b = _flatten(saved), _flatten(to_dict(cfg))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == c or k.startswith(c + ".") for c in CHANGEABLE_ON_RESUME)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"the run dir holds a run with a different config ({shown}"
                          f"{', ...' if len(diff) > 4 else ''}): use a new --run-dir, or the same config")


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, stage_name: str, run_dir: str | Path):
        self.cfg, self.stage_name, self.run_dir = cfg, stage_name, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Data and stage first: a bad path or an unimplemented stage fails before distributed start-up.
        # data.loader=torch: decoded into memory here; dali: decoded per batch, each rank only its slice (_collate).
        self.dataset = build_training_data(cfg.data)
        for op, impl in dataclasses.asdict(cfg.kernels).items():
            kernel_dispatch.set_policy(op, impl)
        check_scale_out(cfg, stage_name)
        torch.manual_seed(cfg.train.seed)   # the initial weights are fixed by the seed
        self.stage = build_stage(stage_name, cfg)
        self.placement = None
        if stage_name == "mid" and cfg.mid.pipeline == "teacher_ranks":
            self.placement = init_teacher_ranks(cfg.mid.teacher_ranks)
            self.rank, self.world = self.placement.rank, self.placement.students   # world: the student ranks
        else:
            self.rank, self.world = init_distributed()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        # A dedicated teacher rank only rolls the teacher out: no DeepSpeed, optimizer, EMA, checkpoints or logs.
        self.teacher_rank = self.placement is not None and self.placement.role == "teacher"
        if not self.teacher_rank:
            self._init_student()
        # Every rank draws the same global batch and keeps its slice, so the data stream is fixed by the seed.
        self.sampler = InfiniteSampler(len(self.dataset), cfg.train.batch_size // cfg.train.grad_accum,
                                       seed=cfg.train.seed, random_flip=cfg.data.xflip)
        self.progress = Progress()
        self._zero0_grad_norm: float | None = None

    def _init_student(self) -> None:
        """The student side: DeepSpeed engine, optimizer, lr schedule and EMA (not on a teacher rank)."""
        cfg = self.cfg
        import deepspeed

        model = self.stage.model.to(self.device)
        # Taken while the weights are whole on every rank: ZeRO-3 partitions `model` in place below.
        self.ema = EMA(model, cfg.train.ema_beta, cfg.train.ema_warmup)
        self._export_model = copy.deepcopy(model).cpu()
        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg, step * cfg.train.batch_size))
        ds_config = deepspeed_config(cfg, self.world)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # Weights a network renormalises itself (EDM2's forced weight normalisation), see _renormalize_masters.
        self._forced_norm = [(m.weight, m.normalize_weight) for m in model.modules() if hasattr(m, "normalize_weight")]

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write to a temporary tag, then rename and repoint latest.json: a kill never leaves half a checkpoint."""
        tag = f"step-{self.progress.step:08d}"
        tmp_tag = f"tmp-{tag}"
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir / tmp_tag, ignore_errors=True)
        torch.distributed.barrier()
        client = {"progress": vars(self.progress).copy(), "ema": self.ema.state_dict(),
                  "sampler": self.sampler.state_dict()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
            os.replace(self.ckpt_dir / tmp_tag, self.ckpt_dir / tag)
            _atomic_write(self.ckpt_dir / "latest.json", json.dumps({"tag": tag, **vars(self.progress)}))
            for old in sorted(self.ckpt_dir.glob("step-*"))[:-max(1, self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
            self.export()
        torch.distributed.barrier()

    def maybe_resume(self) -> bool:
        latest = self.ckpt_dir / "latest.json"
        if not latest.is_file():
            return False
        tag = json.loads(latest.read_text())["tag"]
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"checkpoint {self.ckpt_dir / tag} could not be loaded: delete it to restart "
                               "from the previous one, or use a new --run-dir")
        self.progress = Progress(**client["progress"])
        self.ema.load_state_dict(client["ema"])
        self.sampler.load_state_dict(client["sampler"])
        self._trim_log(self.progress.nimg)
        if self.rank == 0:
            print(f"resumed from {self.ckpt_dir / tag} at {self.progress.nimg / 1000:g} kimg", file=sys.stderr)
        return True

    def export(self, out_dir: Path | None = None) -> None:
        ema_model = self._export_model
        self.ema.copy_to(ema_model)
        export_network(ema_model.net, self.cfg, out_dir or self.run_dir / "export",
                       meta={"stage": self.stage_name, "kimg": self.progress.nimg / 1000, "step": self.progress.step})

    # -- logging ------------------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _trim_log(self, nimg: int) -> None:
        """Drop log rows written after the checkpoint we resume from, so the log reads as one run."""
        path = self.run_dir / "log.jsonl"
        if self.rank == 0 and path.is_file():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["kimg"] * 1000 <= nimg]
            _atomic_write(path, "".join(r + "\n" for r in rows))

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        if self.teacher_rank:
            return self._serve_pairs()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved = self.run_dir / "config.yaml"
            if saved.is_file() and (self.ckpt_dir / "latest.json").is_file():
                import yaml
                check_resume_compatible(yaml.safe_load(saved.read_text()), cfg)
            save_config(cfg, saved)
        torch.distributed.barrier()
        resumed = self.maybe_resume()
        total = int(t.total_kimg * 1000)
        next_ckpt = _next_multiple(self.progress.nimg, t.checkpoint_every_kimg * 1000)
        next_log = _next_multiple(self.progress.nimg, t.log_every_kimg * 1000)
        next_snapshot = _next_multiple(self.progress.nimg, t.snapshot_every_kimg * 1000)
        bar = _progress_bar(self.rank == 0 and t.progress, total, self.progress.nimg, self.stage_name, resumed)
        micro = t.batch_size // (self.world * t.grad_accum)
        losses, grad_norms, tick = [], [], time.time()
        teacher_sec = student_sec = 0.0
        rate_name = "pairs/s" if self._makes_pairs() else "img/s"
        with self._producer() as producer:
            while self.progress.nimg < total:
                for _ in range(t.grad_accum):
                    item = next(producer)
                    started = time.perf_counter()
                    loss = self._micro_step(item)
                    student_sec += time.perf_counter() - started
                    teacher_sec += item.seconds
                    losses.append(loss.detach())
                grad_norms.append(self._grad_norm())
                self.progress.step += 1
                self.progress.nimg += t.batch_size
                self._update_ema()
                if not math.isfinite(losses[-1].item()):
                    raise FloatingPointError(f"loss became {losses[-1].item()} at kimg {self.progress.nimg / 1000:.1f}: "
                                             "lower optim.lr or set optim.grad_clip")
                bar.update(t.batch_size)
                if self.progress.nimg >= next_log or self.progress.nimg >= total:
                    mean_loss = _mean_over_ranks(torch.stack(losses).mean())
                    elapsed = time.time() - tick
                    kimg_done = len(losses) * micro * self.world / 1000
                    row = {"kimg": self.progress.nimg / 1000, "step": self.progress.step, "loss": mean_loss,
                           "lr": self.scheduler.get_last_lr()[0], "sec_per_kimg": elapsed / max(kimg_done, 1e-9)}
                    if rate_name == "pairs/s":
                        # this rank's seconds in the interval making pairs (in the producer thread when
                        # pipelined, so the two may add up to more than the wall time) and training on them
                        row.update(teacher_sec=teacher_sec, student_sec=student_sec)
                    if grad_norms[-1] is not None:
                        row["grad_norm"] = sum(grad_norms) / len(grad_norms)
                    row.update(getattr(self.stage, "counters", {}))   # counted work (teacher NFEs, pairs, ...)
                    row["kernels"] = kernel_dispatch.implementations_run()   # which implementation each op used
                    self._log(row)
                    bar.set_postfix(**{"loss": f"{mean_loss:.4f}", "lr": f"{row['lr']:.2e}",
                                       rate_name: f"{1000 * kimg_done / max(elapsed, 1e-9):.0f}"})
                    losses, grad_norms, tick = [], [], time.time()
                    teacher_sec = student_sec = 0.0
                    next_log = _next_multiple(self.progress.nimg, t.log_every_kimg * 1000)
                if self.progress.nimg >= next_snapshot:
                    if self.rank == 0:
                        self.export(self.run_dir / "snapshots" / f"kimg-{self.progress.nimg / 1000:08.1f}")
                    next_snapshot = _next_multiple(self.progress.nimg, t.snapshot_every_kimg * 1000)
                if self.progress.nimg >= next_ckpt or self.progress.nimg >= total:
                    self.save_checkpoint()
                    next_ckpt = _next_multiple(self.progress.nimg, t.checkpoint_every_kimg * 1000)
        bar.close()
        if self.rank == 0 and not (self.run_dir / "export").is_dir():
            self.export()
        torch.distributed.barrier()
        return self.run_dir / "export"

    # -- one micro-step --------------------------------------------------------------------------------
    def _makes_pairs(self) -> bool:
        """Whether the stage splits into a teacher side and a student side the producer can overlap."""
        return hasattr(self.stage, "make_pairs") and hasattr(self.stage, "pair_loss")

    def _jobs(self, collate: bool = True) -> Iterator[MicroJob]:
        """Every micro-step of this rank from the current position on, in training order.

        Drawn from a copy of the sampler: a producer running ahead must not move the position that a
        checkpoint records (the trainer adopts each job's position when it consumes the job).
        ``collate=False``: without the batch (a teacher rank makes the pairs, from its own copy).
        """
        t = self.cfg.train
        sampler = copy.deepcopy(self.sampler)
        micro = t.batch_size // (self.world * t.grad_accum)
        step = self.progress.step
        while True:
            for m in range(t.grad_accum):
                sampled = next(sampler)
                batch = self._collate(sampled, micro) if collate else None
                yield MicroJob(step=step, micro=m, seed=step_seed(t.seed, step, m * self.world + self.rank),
                               batch=batch, sampler_state=sampler.state_dict())
            step += 1

    def _producer(self):
        """The source of micro-steps: pairs made in line, or ahead in a thread (mid.pipeline=thread)."""
        if not self._makes_pairs():
            return SerialProducer(self._jobs(), lambda job: None)
        make = lambda job: self.stage.make_pairs(       # noqa: E731 - counted when consumed (_micro_step)
            job.batch, torch.Generator(self.device).manual_seed(job.seed), count=False)
        if self.cfg.mid.pipeline == "thread":
            return ThreadedProducer(self._jobs(), make, depth=self.cfg.mid.pipeline_depth, device=self.device)
        if self.placement is not None:
            return self._receive_pairs()
        return SerialProducer(self._jobs(), make)

    # -- dedicated teacher ranks (mid.pipeline=teacher_ranks) ---------------------------------------------
    def _receive_pairs(self) -> RemoteProducer:
        """Student rank: tell the teacher ranks where training starts, then take the pairs they send."""
        from engine.rollout import TrajectoryPairs

        p = self.placement
        if self.rank == 0:    # the resumed position (or the start): the teacher ranks hold no checkpoint
            start = {"step": self.progress.step, "nimg": self.progress.nimg, "sampler": self.sampler.state_dict()}
            for teacher in range(p.students, p.students + p.teachers):
                for work, _ in send_message(p.pairs, teacher, MSG_START, start):
                    work.wait()
        return RemoteProducer(self._jobs(collate=False), p.pairs, src=p.students + self.rank % p.teachers,
                              build=TrajectoryPairs, device=self.device)

    def _serve_pairs(self) -> Path:
        """Teacher rank: make and send the pairs of each job of the student ranks it serves until training ends.

        Student rank r's micro-step m of step s gets exactly what it would make serially: the pairs of its
        slice of the batch, from the generator step_seed(seed, s, m·S + r).
        """
        p, t = self.placement, self.cfg.train
        kind, start, _ = recv_message(p.pairs, 0)
        if kind != MSG_START:
            raise RuntimeError(f"teacher rank {self.rank}: expected the start message from student rank 0, "
                               f"got message kind {kind}")
        self.progress = Progress(step=start["step"], nimg=start["nimg"])
        self.sampler.load_state_dict(start["sampler"])
        steps = max(0, math.ceil((int(t.total_kimg * 1000) - self.progress.nimg) / t.batch_size))
        students = [r for r in range(p.students) if r % p.teachers == self.rank - p.students]
        micro = t.batch_size // (p.students * t.grad_accum)

        def plan():
            sampler = copy.deepcopy(self.sampler)
            for step in range(self.progress.step, self.progress.step + steps):
                for m in range(t.grad_accum):
                    sampled = next(sampler)
                    for r in students:
                        yield r, MicroJob(step=step, micro=m, seed=step_seed(t.seed, step, m * p.students + r),
                                          batch=self._slice_for(sampled, micro, r), sampler_state={})

        make = lambda job: self.stage.make_pairs(       # noqa: E731 - counted by the student that uses them
            job.batch, torch.Generator(self.device).manual_seed(job.seed), count=False)
        serve_pairs(p.pairs, plan(), make, depth=self.cfg.mid.pipeline_depth, students=students)
        return self.run_dir / "export"

    def _slice_for(self, sampled, micro: int, rank: int) -> dict:
        """Student rank ``rank``'s slice of a sampled batch, collated as that rank would (_collate)."""
        own, self.rank = self.rank, rank
        try:
            return self._collate(sampled, micro)
        finally:
            self.rank = own

    def _micro_step(self, item) -> torch.Tensor:
        """Forward, backward and (at the accumulation boundary) the optimizer step for one job."""
        job = item.job
        self.sampler.load_state_dict(job.sampler_state)
        torch.manual_seed(job.seed ^ 1)      # dropout and any other global-RNG use of the student side
        if item.pairs is None:
            loss = self.stage.loss(self.engine, job.batch, torch.Generator(self.device).manual_seed(job.seed))
        else:
            self.stage.count_pairs(item.pairs)
            loss = self.stage.pair_loss(self.engine, item.pairs)
        self.engine.backward(loss)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            self._zero0_grad_norm = _norm_of_grads(self.stage.model)   # gone after step(); ZeRO>=1 keeps its own
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self._renormalize_masters()
        return loss

    @torch.no_grad()
    def _renormalize_masters(self) -> None:
        """Forced weight normalisation on DeepSpeed's fp32 master weights.

        A network like EDM2 renormalises its stored weights in each training forward; under ZeRO 1-3 or
        bf16 the optimizer owns a separate fp32 copy and writes it back after every step, which would undo
        that and let weight norms (and so the effective learning rate) drift. Plain fp32 ZeRO-0 has no
        master copy and needs nothing here. Collective under ZeRO-3: every rank runs the same loop.
        """
        if not self._forced_norm:
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for param, normalize in self._forced_norm:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, normalize(master))

    def _grad_norm(self) -> float | None:
        """The last step's global gradient norm (before clipping)."""
        if self.zero_stage == 0:
            return self._zero0_grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _update_ema(self) -> None:
        """Under ZeRO-3 each rank holds a shard of each parameter: gather them whole for the update."""
        gathered = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed
            gathered = deepspeed.zero.GatheredParameters(list(self.stage.model.parameters()), modifier_rank=None)
        with gathered:
            self.ema.update(self.stage.model, self.progress.step)

    def _collate(self, sampled, micro: int) -> dict:
        """This rank's slice of the global (micro-)batch, on the device."""
        lo = self.rank * micro
        flip = None if sampled.flip is None else sampled.flip[lo:lo + micro]
        images, labels = self.dataset.gather(sampled.indices[lo:lo + micro], flip)
        batch = {"images": images.to(self.device)}
        if self.cfg.network.num_classes > 0:
            batch["labels"] = labels.to(self.device)
        return batch


# --------------------------------------------------------------------------------------------------
def _next_multiple(nimg: int, every: float) -> float:
    if every <= 0:
        return float("inf")
    return (math.floor(nimg / every) + 1) * every


def _norm_of_grads(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().float().clone()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x.item()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _NullBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress_bar(enabled: bool, total: int, start: int, stage: str, resumed: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    desc = f"{stage}{' (resumed)' if resumed else ''}"
    return tqdm(total=total, initial=start, desc=desc, unit="img", unit_scale=True, file=sys.stderr,
                mininterval=2.0, dynamic_ncols=True)
