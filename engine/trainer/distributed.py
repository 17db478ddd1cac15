"""Where this process sits: torch.distributed and DeepSpeed start-up, dedicated teacher ranks, the DeepSpeed
config, and collectives that make every rank fail the same way at once."""
from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.config import Config, TrainConfig
from engine.errors import ConfigError, MissingFileError, UserError
from engine.stages.base import Pipeline


@dataclass
class World:
    """This process's place in the launched world.

    Student ranks 0..students−1 form torch.distributed's default group: DeepSpeed, checkpoints and logs see
    only them. With dedicated teacher ranks (mid.pipeline=teacher_ranks) the last ``teachers`` launched
    processes only roll the teacher out (``role == "teacher"``, ``rank`` their global rank) and every rank
    joins ``pairs_group``, a gloo group over all of them for the pairs.
    """
    role: str               # "student" or "teacher"
    rank: int
    students: int
    device: torch.device
    teachers: int = 0
    pairs_group: object = None

    @property
    def is_main(self) -> bool:
        """The student rank that writes files (logs, checkpoints' renames, exports)."""
        return self.role == "student" and self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")


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


def init_teacher_ranks(teachers: int) -> World:
    """Split the launched world (torchrun's RANK/WORLD_SIZE) into student ranks and ``teachers`` teacher ranks.

    The student ranks form torch.distributed's default group, so DeepSpeed (which calls barriers on the
    default group, e.g. in save_checkpoint) and the trainer's own collectives see the students only, and
    RANK/WORLD_SIZE are rewritten to the student world. Teacher ranks join no default group. All ranks join
    a separate gloo group for the pairs (engine/trainer/teacher_ranks.py). Both come from one env://
    rendezvous store.
    """
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
        return World("teacher", rank, students, _device(), teachers, pairs)
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(students))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore("cmt-students/", store),
                                         rank=rank, world_size=students)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)   # adopts the student group
    return World("student", rank, students, _device(), teachers, pairs)


def launch(pipeline: Optional[Pipeline]) -> World:
    """Start this process's part of the world: with dedicated teacher ranks if the stage's pipeline asks."""
    if pipeline is not None and pipeline.mode == "teacher_ranks":
        return init_teacher_ranks(pipeline.teacher_ranks)
    rank, size = init_distributed()
    return World("student", rank, size, _device())


def micro_batch_size(train: TrainConfig, students: int) -> int:
    """Images (pairs) per micro-step and rank: train.batch_size over ranks × train.grad_accum, exactly."""
    micro = train.batch_size // (students * train.grad_accum)
    if micro < 1 or micro * students * train.grad_accum != train.batch_size:
        raise ConfigError(f"train.batch_size={train.batch_size} must be divisible by the {students} training "
                          f"rank(s) x train.grad_accum={train.grad_accum}")
    return micro


def _base_deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise MissingFileError(f"train.deepspeed_config '{path}' does not exist: use a file from "
                                   "configs/deepspeed/")
        try:
            ds = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            raise ConfigError(f"train.deepspeed_config '{path}' is not readable JSON ({error}): fix it or use a "
                              "file from configs/deepspeed/") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"train.deepspeed_config '{path}' must hold a JSON object, not {type(ds).__name__}")
        return ds
    ds = {"zero_optimization": {"stage": t.zero_stage}}
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage this run will use (from train.deepspeed_config if set, else train.zero_stage)."""
    return int(_base_deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(cfg: Config, students: int) -> dict:
    """The DeepSpeed JSON for this run: a user file if named, else built from train.*."""
    t = cfg.train
    ds = _base_deepspeed_config(cfg)
    ds.update(train_batch_size=t.batch_size, train_micro_batch_size_per_gpu=micro_batch_size(t, students),
              gradient_accumulation_steps=t.grad_accum, steps_per_print=2**62, wall_clock_breakdown=False)
    # Always explicit: DeepSpeed's own default clips at 1.0, which would silently change "0 = off".
    ds["gradient_clipping"] = cfg.optim.grad_clip
    # DeepSpeed vets client optimizers for ZeRO by class and knows only Adam/AdamW. ZeRO hands the optimizer
    # flat shards of the parameters, which is right for any elementwise update: RAdam (optim.name) is one.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def on_main_rank_for_all(world: World, check: Callable[[], None]) -> None:
    """Run ``check`` on the main rank and raise what it raised (a UserError) on every student rank at once,
    so no rank waits at a barrier for one that has failed."""
    outcome = [None]
    if world.is_main:
        try:
            check()
        except UserError as error:
            outcome = [(type(error), str(error))]
    if world.students > 1:
        torch.distributed.broadcast_object_list(outcome, src=0, device=world.device)
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise kind(message)


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().float().clone()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x.item()
