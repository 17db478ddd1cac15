"""Where a stage's prepared inputs are made: in line, or ahead of the student through a bounded buffer.

CMT's rollout is sequential in t and costs about as much as the student's step (paper App. C), but it does
not depend on the student: pairs for micro-step k+1 can be made while the student trains on those of step k.

The trainer describes every micro-step as a :class:`MicroJob` (its batch and its seed, a pure function of
(seed, step, chunk)) and hands a stream of jobs and a ``make`` function (job → pairs, :func:`preparer`) to a
producer:

- :class:`SerialProducer` makes each job's pairs when asked, in the calling thread (``mid.pipeline=serial``);
- :class:`ThreadedProducer` makes them in a background thread, at most ``depth`` jobs ahead
  (``mid.pipeline=thread``). On CPU the two threads run on two cores because torch releases the GIL
  inside its ops; on CUDA the producer works on a side stream and hands an event over with the pairs.
- :class:`engine.trainer.teacher_ranks.RemoteProducer` receives them from dedicated teacher ranks
  (``mid.pipeline=teacher_ranks``).

Guarantees, whatever the producer:

- **Same stream.** Jobs are consumed in the order they were made (one producer, a FIFO), each exactly
  once, and ``make`` sees only the job, so pipelined pairs are bit-identical to serial ones. That needs
  ``make`` to draw from the job's own generator only, never the global RNG, which the student's dropout
  uses in the other thread (MidTraining.prepare guarantees this; the teacher is in eval mode).
- **Failure, not a hang.** An exception in the producer is re-raised by the consumer at the job it
  failed on, with a note saying where it came from (SystemExit and KeyboardInterrupt too, as a
  RuntimeError with their message); a producer that vanishes without one is an error too, and one that
  delivers nothing for ``timeout_s`` (mid.producer_timeout_s) stops training with a one-line StalledError.
- **Resume.** A producer holds nothing a checkpoint needs: pairs made but not yet used are a function of
  their jobs' seeds and are made again after a restart.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from engine.errors import StalledError
from engine.stages.base import Stage
from engine.trainer.batches import MicroJob
from kernels import dispatch


@dataclass
class Produced:
    """A job with what ``make`` returned for it, the seconds that took (the teacher's time) and the kernel
    implementations it ran ({"op:impl": calls}, wherever it was made)."""
    job: MicroJob
    prepared: Any
    seconds: float
    kernels: Counter = field(default_factory=Counter)
    ready: Optional[Any] = None     # CUDA event recorded after the pairs were made on the side stream


def preparer(stage: Stage, device: torch.device) -> Callable[[MicroJob], Any]:
    """job → ``stage.prepare(job.batch, generator)``, the generator seeded with the job's own seed."""
    return lambda job: stage.prepare(job.batch, torch.Generator(device).manual_seed(job.seed))


class SerialProducer:
    """Makes each job's pairs when the consumer asks for it, in the consumer's thread."""

    def __init__(self, jobs: Iterator[MicroJob], make: Callable[[MicroJob], Any]):
        self.jobs, self.make = jobs, make

    def __iter__(self):
        return self

    def __next__(self) -> Produced:
        job = next(self.jobs)
        start = time.perf_counter()
        with dispatch.counting() as kernels:
            pairs = self.make(job)
        return Produced(job, pairs, time.perf_counter() - start, kernels)

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
                 device: torch.device | str = "cpu", timeout_s: float = 1800.0):
        if depth < 1:
            raise ValueError(f"pipeline depth must be >= 1, got {depth}")
        super().__init__(jobs, make)
        self.timeout_s = timeout_s
        self._working_on: Optional[MicroJob] = None   # the job the producer thread is making
        self.device = torch.device(device)
        self._forcing = dispatch.forcing_of_this_thread()   # kernels forced where the producer was made
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failed = False
        # daemon: an interpreter exiting on an error in the main thread never waits for the producer.
        self._thread = threading.Thread(target=self._run, name="pair-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with dispatch.forcing(self._forcing):
            self._produce()

    def _produce(self) -> None:
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        job = None
        try:
            for job in self.jobs:
                if self._stop.is_set():
                    return
                self._working_on = job
                start = time.perf_counter()
                with dispatch.counting() as kernels:
                    if side is None:
                        item = Produced(job, self.make(job), time.perf_counter() - start, kernels)
                    else:
                        with torch.cuda.stream(side):
                            pairs = self.make(job)
                            ready = torch.cuda.Event()
                            ready.record(side)
                        item = Produced(job, pairs, time.perf_counter() - start, kernels, ready)
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
        waited = 0.0
        while True:
            try:
                item = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                waited += self._POLL_S
                if not self._thread.is_alive() and self._queue.empty():
                    self._failed = True
                    raise RuntimeError("the pair producer thread stopped without a result or an error "
                                       "(was the producer closed?)") from None
                if waited >= self.timeout_s:
                    self._failed = True
                    job = self._working_on
                    where = "" if job is None else f" (it is making step {job.step}, micro-step {job.micro})"
                    raise StalledError(f"the pair producer delivered nothing for {self.timeout_s:g} s{where}: is "
                                       "the teacher stuck? raise mid.producer_timeout_s if it is only slow") from None
        if isinstance(item, _Failed):
            self._failed = True
            self.close()
            where = "" if item.job is None else f" while making the pairs of step {item.job.step}, " \
                                                f"micro-step {item.job.micro}"
            error = item.error
            if not isinstance(error, Exception):   # SystemExit, KeyboardInterrupt: not the main thread's to obey
                error = RuntimeError(f"the pair producer stopped with {type(error).__name__}: {error}")
                error.__cause__ = item.error
            error.add_note(f"raised in the pipelined pair producer{where} (mid.pipeline=thread)")
            raise error
        if item.ready is not None:   # CUDA: the student's stream waits for the side stream's work
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.ready)
            for value in vars(item.prepared).values():
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
