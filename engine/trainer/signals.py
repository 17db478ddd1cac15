"""SIGTERM (what cluster schedulers send first) and SIGINT (Ctrl-C) during training: finish the step, write a
checkpoint, stop with one line. A second signal stops at once. Every student rank stops after the same step:
the ranks agree on the signal at each step's end (a one-number all-reduce on a CPU group)."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import torch

from engine.trainer.distributed import World

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalFlag:
    """Within the block SIGTERM/SIGINT set ``received`` (the first) instead of ending the process; a second
    ends it at once. Outside the main thread (where Python allows no handlers) it does nothing."""

    def __init__(self, on_first: str = "finishing this step and writing a checkpoint"):
        self.received, self._previous, self.on_first = 0, {}, on_first

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            print(f"stopped: a second {name}, without a checkpoint (the last one written is intact)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"{name} received: {self.on_first} (send it again to stop at once)", file=sys.stderr, flush=True)


class StopRequests(SignalFlag):
    """A SignalFlag the student ranks agree on at each step's end."""

    def __init__(self, world: World):
        super().__init__()
        self.world, self._group = world, None
        if world.students > 1 and torch.distributed.get_backend() != "gloo":
            self._group = torch.distributed.new_group(backend="gloo")   # the agreement never touches the GPU

    def agreed(self) -> Optional[int]:
        """The signal any student rank received (the same answer on every rank), or None."""
        if self.world.students == 1:
            return self.received or None
        flag = torch.tensor([self.received], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag) or None
