"""Explicit, observable choice between an op's fast path and its PyTorch reference.

Each op names its implementations (e.g. ``dpm_solver_step``: ``triton`` | ``torch``). The policy per op
is ``auto`` (the op's own rule, typically: the fast path for CUDA tensors when it is available, the
reference otherwise) or one forced implementation. The policy comes from, in increasing priority, the
environment variable ``CMT_KERNELS="op=impl,op=impl"``, ``set_policy`` (what the engine does with the
config's ``kernels:`` section) and the ``forced`` context manager. Every call records what ran, so
``last_implementation(op)`` and ``implementations_run()`` answer "which kernel did that use?".

Forcing a fast path where it cannot run (Triton on CPU tensors without ``TRITON_INTERPRET=1``, an
extension that did not build) raises rather than silently falling back.
"""

import contextlib
import os
from collections import Counter
from typing import Iterator

AUTO = "auto"
OPS: dict[str, tuple[str, ...]] = {
    "dpm_solver_step": ("triton", "torch"),
    "attention": ("triton", "torch"),
    "feature_distance": ("cuda", "cpp", "torch"),
}

_policy: dict[str, str] = {}
_forced_stack: list[tuple[str, str]] = []
_last: dict[str, str] = {}
_counts: Counter = Counter()


def _check(op: str, impl: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    if impl != AUTO and impl not in OPS[op]:
        raise ValueError(f"unknown implementation {impl!r} for {op}; choose from auto, {', '.join(OPS[op])}")


def _env_policy() -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get("CMT_KERNELS", "").split(","))):
        op, sep, impl = item.partition("=")
        if not sep:
            raise ValueError(f"CMT_KERNELS entry {item!r} is not op=impl")
        _check(op.strip(), impl.strip())
        out[op.strip()] = impl.strip()
    return out


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
    for forced_op, impl in reversed(_forced_stack):
        if forced_op == op:
            return impl
    return _policy.get(op) or _env_policy().get(op, AUTO)


@contextlib.contextmanager
def forced(op: str, impl: str) -> Iterator[None]:
    """Within the block, ``op`` runs as ``impl`` (or ``auto``)."""
    _check(op, impl)
    _forced_stack.append((op, impl))
    try:
        yield
    finally:
        _forced_stack.pop()


def record(op: str, impl: str) -> str:
    """Called by an op when it runs; returns ``impl`` for convenience."""
    _last[op] = impl
    _counts[(op, impl)] += 1
    return impl


def last_implementation(op: str):
    """The implementation of ``op``'s most recent call, or None if it has not run."""
    return _last.get(op)


def implementations_run(reset: bool = False) -> dict[str, int]:
    """{"op:impl": calls} since the start (or the last reset)."""
    out = {f"{op}:{impl}": n for (op, impl), n in sorted(_counts.items())}
    if reset:
        _counts.clear()
    return out
