"""Explicit, observable choice between an op's fast path and its PyTorch reference.

Each op names its implementations (e.g. ``dpm_solver_step``: ``triton`` | ``torch``). The policy per op
is ``auto`` (the op's own rule, typically: the fast path for CUDA tensors when it is available, the
reference otherwise) or one forced implementation. The policy comes from, in increasing priority, the
environment variable ``CMT_KERNELS="op=impl,op=impl"`` (read once, at the first call that needs it;
:func:`reload_environment` reads it again), ``set_policy`` (process-wide: what the engine does with the
config's ``kernels:`` section) and the ``forced`` context manager (this thread only: a producer thread
the engine starts takes the forcing of the thread that started it, see :func:`forcing_of_this_thread`).
Every call records what ran, so ``last_implementation(op)`` and ``implementations_run()`` answer "which
kernel did that use?"; ``counting()`` counts what one thread ran within a block (what a training step
used, whatever other threads did meanwhile).

Forcing a fast path where it cannot run (Triton on CPU tensors without ``TRITON_INTERPRET=1``, an
extension that did not build) raises rather than silently falling back.
"""

import contextlib
import os
import threading
from collections import Counter
from typing import Iterator

AUTO = "auto"
OPS: dict[str, tuple[str, ...]] = {
    "dpm_solver_step": ("triton", "torch"),
    "attention": ("triton", "torch"),
    "feature_distance": ("cuda", "cpp", "torch"),
}

_policy: dict[str, str] = {}
_env: dict[str, str] | None = None     # CMT_KERNELS, parsed on first use
_local = threading.local()             # .forced: this thread's forced() stack; .counting: its open counters
_lock = threading.Lock()               # guards the records, written from producer threads too
_last: dict[str, str] = {}
_counts: Counter = Counter()


def _check(op: str, impl: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    if impl != AUTO and impl not in OPS[op]:
        raise ValueError(f"unknown implementation {impl!r} for {op}; choose from auto, {', '.join(OPS[op])}")


def _env_policy() -> dict[str, str]:
    global _env
    if _env is None:
        out = {}
        for item in filter(None, (s.strip() for s in os.environ.get("CMT_KERNELS", "").split(","))):
            op, sep, impl = item.partition("=")
            if not sep:
                raise ValueError(f"CMT_KERNELS entry {item!r} is not op=impl")
            _check(op.strip(), impl.strip())
            out[op.strip()] = impl.strip()
        _env = out
    return _env


def reload_environment() -> None:
    """Read ``CMT_KERNELS`` again at the next call (it is otherwise read once per process)."""
    global _env
    _env = None


def _forced_stack() -> list[tuple[str, str]]:
    if not hasattr(_local, "forced"):
        _local.forced = []
    return _local.forced


def set_policy(op: str, impl: str) -> None:
    """Use ``impl`` for ``op`` from now on; ``auto`` clears the setting, so ``CMT_KERNELS`` applies again
    (a config's default ``auto`` must not override what the user set in the environment)."""
    _check(op, impl)
    if impl == AUTO:
        _policy.pop(op, None)
    else:
        _policy[op] = impl


def policy(op: str) -> str:
    """The implementation forced for ``op``, or ``auto``."""
    _check(op, AUTO)
    for forced_op, impl in reversed(_forced_stack()):
        if forced_op == op:
            return impl
    return _policy.get(op) or _env_policy().get(op, AUTO)


@contextlib.contextmanager
def forced(op: str, impl: str) -> Iterator[None]:
    """Within the block and in this thread, ``op`` runs as ``impl`` (or ``auto``)."""
    _check(op, impl)
    stack = _forced_stack()
    stack.append((op, impl))
    try:
        yield
    finally:
        stack.pop()


def forcing_of_this_thread() -> tuple[tuple[str, str], ...]:
    """What ``forced`` blocks are open in this thread, to hand to a thread it starts (:func:`forcing`)."""
    return tuple(_forced_stack())


@contextlib.contextmanager
def forcing(stack: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Within the block, this thread is forced as another was (``forcing_of_this_thread()`` there)."""
    with contextlib.ExitStack() as blocks:
        for op, impl in stack:
            blocks.enter_context(forced(op, impl))
        yield


def record(op: str, impl: str) -> str:
    """Called by an op when it runs; returns ``impl`` for convenience."""
    with _lock:
        _last[op] = impl
        _counts[(op, impl)] += 1
    for counts in getattr(_local, "counting", ()):
        counts[f"{op}:{impl}"] += 1
    return impl


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Within the block, count the implementations this thread runs: a Counter {"op:impl": calls}."""
    if not hasattr(_local, "counting"):
        _local.counting = []
    counts = Counter()
    _local.counting.append(counts)
    try:
        yield counts
    finally:
        _local.counting.remove(counts)


def last_implementation(op: str):
    """The implementation of ``op``'s most recent call, or None if it has not run."""
    return _last.get(op)


def implementations_run(reset: bool = False) -> dict[str, int]:
    """{"op:impl": calls} since the start (or the last reset)."""
    with _lock:
        out = {f"{op}:{impl}": n for (op, impl), n in sorted(_counts.items())}
        if reset:
            _counts.clear()
    return out
