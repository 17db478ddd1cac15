"""Dedicated teacher ranks (mid.pipeline=teacher_ranks): pairs made on other processes and sent to the students.

Of the W launched ranks the first S = W - K train the student (DeepSpeed's world, see
engine.trainer.distributed.init_teacher_ranks) and the last K only roll the teacher out. Teacher rank k serves the
student ranks r with r % K == k: it makes the pairs of exactly the jobs that student would make serially
(same batch slice, same seed step_seed(seed, step, m·S + r)) and sends them point to point over a gloo
group spanning all W ranks. A message is an int64 header [kind, length], a JSON description (job
identity, field shapes and dtypes, counters) and the tensors: nothing received is unpickled. Gloo's send
completes only once the receiver has posted the matching recv, so a teacher with ``depth`` unreceived sends
per student waits: at most ``depth`` micro-batches of pairs are made ahead. The student checks each message against the
job it expects (step, micro-step, seed), so a pair lost, reordered or used twice is an error. A teacher
that fails sends an error message in place of the pairs, and the student raises it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
import traceback
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch

from engine.config import TrainConfig
from engine.errors import StalledError, Stopped
from engine.stages.base import Stage
from engine.trainer.batches import BatchPlan, MicroJob
from engine.trainer.distributed import World
from engine.trainer.producers import Produced, SerialProducer, preparer
from engine.trainer.signals import SignalFlag
from kernels import dispatch

MSG_PAIRS, MSG_ERROR, MSG_START = 0, 1, 2
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                     torch.int64, torch.int32, torch.uint8, torch.bool)}


def send_message(group, dst: int, kind: int, meta: dict, tensors: dict | None = None) -> list:
    """Post the sends of one message to ``dst``; returns the works (keep them, and their tensors, alive
    until they are waited on)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
    meta = dict(meta, tensors={k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()})
    blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    header = torch.tensor([kind, blob.numel()], dtype=torch.int64)
    messages = [header, blob, *tensors.values()]
    return [(group.send([m], dst, 0), m) for m in messages]


def recv_message(group, src: int, device: torch.device | str = "cpu",
                 timeout_s: Optional[float] = None) -> tuple[int, dict, dict]:
    """Receive one message from ``src``: (kind, meta, tensors on ``device``). Waits at most ``timeout_s`` for
    it to begin (StalledError), then for the rest; only tensors of the known dtypes are accepted."""
    def recv(tensor, timeout=None):
        work = group.recv([tensor], src, 0)
        work.wait() if timeout is None else work.wait(timeout)
        return tensor

    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    try:
        kind, length = recv(torch.empty(2, dtype=torch.int64), timeout).tolist()
    except RuntimeError as error:
        if timeout is None or "timed out" not in str(error).lower():
            raise
        raise StalledError(f"teacher rank {src} sent nothing for {timeout_s:g} s: is the teacher stuck? raise "
                           "mid.producer_timeout_s if it is only slow") from None
    meta = json.loads(recv(torch.empty(length, dtype=torch.uint8)).numpy().tobytes())
    specs = meta.pop("tensors")
    if any(dtype not in DTYPES for _, dtype in specs.values()):
        raise RuntimeError(f"teacher rank {src} sent tensors of dtypes {[d for _, d in specs.values()]}")
    tensors = {k: recv(torch.empty(shape, dtype=DTYPES[dtype])).to(device) for k, (shape, dtype) in specs.items()}
    return kind, meta, tensors


def _wait(works: list, timeout=None) -> None:
    for work, _ in works:
        work.wait() if timeout is None else work.wait(timeout)


def _job_meta(job: Optional[MicroJob]) -> dict:
    return {} if job is None else {"step": job.step, "micro": job.micro, "seed": job.seed}


def serve_pairs(group, plan: Iterator[tuple[int, MicroJob]], make: Callable[[MicroJob], Any], depth: int,
                students: list[int], error_timeout_s: float = 60.0) -> int:
    """Teacher rank: for each (student rank, job) of ``plan``, in order, make the job's pairs and send them.

    At most ``depth`` sends per student wait unreceived. On an error every student in ``students`` gets an
    error message (after the pairs already sent to it) and the error is re-raised. Returns the number of
    jobs served once every student has received everything.
    """
    if depth < 1:
        raise ValueError(f"pipeline depth must be >= 1, got {depth}")
    pending: dict[int, list] = {r: [] for r in students}
    job, served = None, 0
    try:
        for dst, job in plan:
            while len(pending[dst]) >= depth:
                _wait(pending[dst].pop(0))
            start = time.perf_counter()
            with dispatch.counting() as kernels:
                pairs = make(job)
            seconds = time.perf_counter() - start
            fields = {f.name: getattr(pairs, f.name) for f in dataclasses.fields(pairs)}
            tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
            values = {k: v for k, v in fields.items() if k not in tensors}
            pending[dst].append(send_message(group, dst, MSG_PAIRS, {**_job_meta(job), "seconds": seconds,
                                                                     "kernels": kernels, "values": values}, tensors))
            served += 1
        for works in pending.values():
            for w in works:
                _wait(w)
        return served
    except BaseException as error:  # noqa: BLE001 - reported to the students, then re-raised
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        where = "" if job is None else f" while making the pairs of step {job.step}, micro-step {job.micro}"
        timeout = datetime.timedelta(seconds=error_timeout_s)
        for dst in students:
            try:
                _wait(send_message(group, dst, MSG_ERROR, {**_job_meta(job), "error": text, "where": where}),
                      timeout)
            except Exception:  # noqa: BLE001 - that student is gone or stuck: the launcher ends the run
                pass
        raise


class RemoteProducer(SerialProducer):
    """Student rank: each job's pairs come from teacher rank ``src`` (mid.pipeline=teacher_ranks).

    ``build`` turns the received fields back into the pairs object (the stage's ``prepared_type``).
    """

    def __init__(self, jobs: Iterator[MicroJob], group, src: int, build: Callable[..., Any],
                 device: torch.device | str = "cpu", timeout_s: Optional[float] = None):
        super().__init__(jobs, make=None)
        self.group, self.src, self.build, self.device = group, src, build, torch.device(device)
        self.timeout_s = timeout_s
        self._failed = False

    def __next__(self) -> Produced:
        if self._failed:
            raise RuntimeError(f"the pair stream from teacher rank {self.src} failed earlier")
        job = next(self.jobs)
        try:
            kind, meta, tensors = recv_message(self.group, self.src, self.device, self.timeout_s)
        except StalledError as error:
            self._failed = True
            raise StalledError(f"{error} (step {job.step}, micro-step {job.micro} was due)") from None
        if kind == MSG_ERROR:
            self._failed = True
            raise RuntimeError(f"teacher rank {self.src} failed{meta['where']}: {meta['error']} "
                               "(mid.pipeline=teacher_ranks; its own log has the traceback)")
        expected = _job_meta(job)
        got = {k: meta.get(k) for k in expected}
        if kind != MSG_PAIRS or got != expected:
            self._failed = True
            raise RuntimeError(f"teacher rank {self.src} sent the pairs of {got} (message kind {kind}) where "
                               f"those of {expected} were due: the pair stream is out of step")
        return Produced(job, self.build(**meta["values"], **tensors), meta["seconds"], Counter(meta["kernels"]))


# --------------------------------------------------------------------------------------------------
# The two sides, as the trainer runs them
# --------------------------------------------------------------------------------------------------
def receive_pairs(stage: Stage, plan: BatchPlan, world: World, first_step: int) -> RemoteProducer:
    """Student rank: tell the teacher ranks where training starts (rank 0 does), then take what they send."""
    if world.rank == 0:    # the resumed step (or 0): the teacher ranks hold no checkpoint
        for teacher in range(world.students, world.students + world.teachers):
            for work, _ in send_message(world.pairs_group, teacher, MSG_START, {"step": first_step}):
                work.wait()
    return RemoteProducer(plan.jobs(world.rank, first_step, with_batch=False), world.pairs_group,
                          src=world.students + world.rank % world.teachers, build=stage.prepared_type,
                          device=world.device, timeout_s=stage.pipeline.timeout_s)


def serve_teacher_rank(stage: Stage, plan: BatchPlan, world: World, train: TrainConfig) -> int:
    """Teacher rank: make and send the prepared inputs of each job of the student ranks it serves, until
    training ends. Student rank r's micro-step m of step s gets exactly what it would make serially: the
    pairs of its chunk of the batch, from the generator step_seed(seed, s, m·S + r). Returns the jobs served.
    """
    kind, start, _ = recv_message(world.pairs_group, 0)
    if kind != MSG_START:
        raise RuntimeError(f"teacher rank {world.rank}: expected the start message from student rank 0, "
                           f"got message kind {kind}")
    first = start["step"]
    last = first + max(0, math.ceil((int(train.total_kimg * 1000) - first * train.batch_size) / train.batch_size))
    students = [r for r in range(world.students) if r % world.teachers == world.rank - world.students]

    def jobs():
        for step in range(first, last):
            for m in range(train.grad_accum):
                for r in students:
                    yield r, plan.job(step, m, r)

    with SignalFlag("serving the students until they stop") as signal_flag:
        try:
            return serve_pairs(world.pairs_group, jobs(), preparer(stage, world.device),
                               depth=stage.pipeline.depth, students=students)
        except Exception:
            if signal_flag.received:   # the students stopped on the signal and left: not this rank's failure
                raise Stopped(f"teacher rank {world.rank}: the students stopped", signal_flag.received) from None
            raise
