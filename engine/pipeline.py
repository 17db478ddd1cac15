"""Pipelined rollout (issue #6): teacher pairs made ahead of the student through a bounded buffer.

CMT's rollout is sequential in t and costs about as much as the student's step (SPEC §8), but it does not
depend on the student: pairs for micro-step k+1 can be made while the student trains on those of step k.

The trainer describes every micro-step as a :class:`MicroJob` (its batch and its seed, a pure function of
(seed, step, chunk)) and hands a stream of jobs and a ``make`` function (job → pairs) to a producer:

- :class:`SerialProducer` makes each job's pairs when asked, in the calling thread (``mid.pipeline=serial``);
- :class:`ThreadedProducer` makes them in a background thread, at most ``depth`` jobs ahead
  (``mid.pipeline=thread``). On CPU the two threads run on two cores because torch releases the GIL
  inside its ops; on CUDA the producer works on a side stream and hands an event over with the pairs.
- :func:`serve_pairs` / :class:`RemoteProducer` make them on dedicated teacher ranks and send them to the
  student ranks point to point, at most ``depth`` jobs ahead per student (``mid.pipeline=teacher_ranks``,
  see the section at the end; tests/test_teacher_ranks.py).

Guarantees, whatever the producer (tests/test_pipeline.py):

- **Same stream.** Jobs are consumed in the order they were made (one producer, a FIFO), each exactly
  once, and ``make`` sees only the job, so pipelined pairs are bit-identical to serial ones. That needs
  ``make`` to draw from the job's own generator only, never the global RNG, which the student's dropout
  uses in the other thread (MidTraining.make_pairs guarantees this; the teacher is in eval mode).
- **Failure, not a hang.** An exception in the producer is re-raised by the consumer at the job it
  failed on, with a note saying where it came from; a producer that vanishes without one is an error too.
- **Resume.** A producer holds nothing a checkpoint needs: pairs made but not yet used are a function of
  their jobs' seeds and are made again after a restart.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch


@dataclass
class MicroJob:
    """What one micro-step of one rank needs: which step it belongs to, its seed and its batch.

    ``sampler_state`` is the data sampler's position after drawing ``batch``: the trainer adopts it when
    the job is consumed, so a checkpoint records the consumed position, not the producer's.
    """
    step: int
    micro: int
    seed: int
    batch: dict
    sampler_state: dict


@dataclass
class Produced:
    """A job with what ``make`` returned for it and the seconds that took (the teacher's time)."""
    job: MicroJob
    pairs: Any
    seconds: float
    ready: Optional[Any] = None     # CUDA event recorded after the pairs were made on the side stream


class SerialProducer:
    """Makes each job's pairs when the consumer asks for it, in the consumer's thread."""

    def __init__(self, jobs: Iterator[MicroJob], make: Callable[[MicroJob], Any]):
        self.jobs, self.make = jobs, make

    def __iter__(self):
        return self

    def __next__(self) -> Produced:
        job = next(self.jobs)
        start = time.perf_counter()
        pairs = self.make(job)
        return Produced(job, pairs, time.perf_counter() - start)

    def close(self) -> None:
        """Nothing runs in the background; present so both producers are used the same way."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Failed:
    def __init__(self, job: Optional[MicroJob], error: BaseException):
        self.job, self.error = job, error


class ThreadedProducer(SerialProducer):
    """Makes pairs in a background thread, at most ``depth`` jobs ahead of the consumer.

    The bounded queue is the only channel between the threads: the producer blocks when ``depth`` results
    wait unused (so memory stays bounded), the consumer blocks while the next result is being made.
    Use as a context manager (or call :meth:`close`) so the thread stops when training ends or fails.
    """

    # How often a blocked side re-checks that the other is still there; not a synchronisation delay.
    _POLL_S = 0.5

    def __init__(self, jobs: Iterator[MicroJob], make: Callable[[MicroJob], Any], depth: int = 2,
                 device: torch.device | str = "cpu"):
        if depth < 1:
            raise ValueError(f"pipeline depth must be >= 1, got {depth}")
        super().__init__(jobs, make)
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failed = False
        # daemon: an interpreter exiting on an error in the main thread never waits for the producer.
        self._thread = threading.Thread(target=self._run, name="pair-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        job = None
        try:
            for job in self.jobs:
                if self._stop.is_set():
                    return
                start = time.perf_counter()
                if side is None:
                    item = Produced(job, self.make(job), time.perf_counter() - start)
                else:
                    with torch.cuda.stream(side):
                        pairs = self.make(job)
                        ready = torch.cuda.Event()
                        ready.record(side)
                    item = Produced(job, pairs, time.perf_counter() - start, ready)
                if not self._put(item):
                    return
            self._put(_Failed(job, RuntimeError("the job stream of the pair producer ended")))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failed(job, error))

    def _put(self, item) -> bool:
        """Queue ``item`` unless the consumer closed the producer meanwhile; False when it did."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Produced:
        if self._failed:
            raise RuntimeError("the pair producer failed earlier: start a new one")
        while True:
            try:
                item = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._failed = True
                    raise RuntimeError("the pair producer thread stopped without a result or an error "
                                       "(was the producer closed?)") from None
        if isinstance(item, _Failed):
            self._failed = True
            self.close()
            where = "" if item.job is None else f" while making the pairs of step {item.job.step}, " \
                                                f"micro-step {item.job.micro}"
            item.error.add_note(f"raised in the pipelined pair producer{where} (mid.pipeline=thread)")
            raise item.error
        if item.ready is not None:   # CUDA: the student's stream waits for the side stream's work
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.ready)
            for value in vars(item.pairs).values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(current)   # keep the allocator from reusing them too early
        return item

    def close(self) -> None:
        """Stop the producer and wait for it: it finishes the job in hand (one rollout at most)."""
        self._stop.set()
        while self._thread.is_alive():
            try:                      # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=self._POLL_S)


# --------------------------------------------------------------------------------------------------
# Dedicated teacher ranks (mid.pipeline=teacher_ranks)
# --------------------------------------------------------------------------------------------------
# Of the W launched ranks the first S = W - K train the student (DeepSpeed's world, see
# engine.trainer.init_teacher_ranks) and the last K only roll the teacher out. Teacher rank k serves the
# student ranks r with r % K == k: it makes the pairs of exactly the jobs that student would make serially
# (same batch slice, same seed step_seed(seed, step, m·S + r)) and sends them point to point over a gloo
# group spanning all W ranks. A message is an int64 header [kind, length], a pickled description (job
# identity, field shapes and dtypes, counters) and the tensors. Gloo's send completes only once the
# receiver has posted the matching recv, so a teacher with ``depth`` unreceived sends per student waits:
# at most ``depth`` micro-batches of pairs are made ahead. The student checks each message against the
# job it expects (step, micro-step, seed), so a pair lost, reordered or used twice is an error. A teacher
# that fails sends an error message in place of the pairs, and the student raises it.

MSG_PAIRS, MSG_ERROR, MSG_START = 0, 1, 2


def send_message(group, dst: int, kind: int, meta: dict, tensors: dict | None = None) -> list:
    """Post the sends of one message to ``dst``; returns the works (keep them, and their tensors, alive
    until they are waited on)."""
    import pickle

    tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
    meta = dict(meta, tensors={k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()})
    blob = torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)
    header = torch.tensor([kind, blob.numel()], dtype=torch.int64)
    messages = [header, blob, *tensors.values()]
    return [(group.send([m], dst, 0), m) for m in messages]


def recv_message(group, src: int, device: torch.device | str = "cpu") -> tuple[int, dict, dict]:
    """Receive one message from ``src`` (blocking): (kind, meta, tensors on ``device``)."""
    import pickle

    def recv(tensor):
        group.recv([tensor], src, 0).wait()
        return tensor

    kind, length = recv(torch.empty(2, dtype=torch.int64)).tolist()
    meta = pickle.loads(recv(torch.empty(length, dtype=torch.uint8)).numpy().tobytes())
    tensors = {k: recv(torch.empty(shape, dtype=getattr(torch, dtype))).to(device)
               for k, (shape, dtype) in meta.pop("tensors").items()}
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
    import dataclasses
    import datetime
    import traceback

    if depth < 1:
        raise ValueError(f"pipeline depth must be >= 1, got {depth}")
    pending: dict[int, list] = {r: [] for r in students}
    job, served = None, 0
    try:
        for dst, job in plan:
            while len(pending[dst]) >= depth:
                _wait(pending[dst].pop(0))
            start = time.perf_counter()
            pairs = make(job)
            seconds = time.perf_counter() - start
            fields = {f.name: getattr(pairs, f.name) for f in dataclasses.fields(pairs)}
            tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
            values = {k: v for k, v in fields.items() if k not in tensors}
            pending[dst].append(send_message(group, dst, MSG_PAIRS, {**_job_meta(job), "seconds": seconds,
                                                                     "values": values}, tensors))
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

    ``build`` turns the received fields back into the pairs object (e.g. TrajectoryPairs).
    """

    def __init__(self, jobs: Iterator[MicroJob], group, src: int, build: Callable[..., Any],
                 device: torch.device | str = "cpu"):
        super().__init__(jobs, make=None)
        self.group, self.src, self.build, self.device = group, src, build, torch.device(device)
        self._failed = False

    def __next__(self) -> Produced:
        if self._failed:
            raise RuntimeError(f"the pair stream from teacher rank {self.src} failed earlier")
        job = next(self.jobs)
        kind, meta, tensors = recv_message(self.group, self.src, self.device)
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
        return Produced(job, self.build(**meta["values"], **tensors), meta["seconds"])
