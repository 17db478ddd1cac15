"""Counted work: kernel launches and bytes read/written by a call, measured by running it, not derived.

Two counters with the same result shape ``{"launches": int, "bytes_read": int, "bytes_written": int,
"ops": [str, ...]}`` (one ``ops`` entry per launch, in order):

``count_eager(fn, *args, **kwargs)`` runs ``fn`` under a ``TorchDispatchMode`` and counts every aten op
that reaches the dispatcher, as one launch (on CUDA each such op is a kernel launch), except ops that
launch nothing: views and metadata ops (any op whose schema returns an alias of an input without writing
it — view, reshape-as-view, expand, as_strided, t, transpose, select, slice, permute, detach, alias, … —
plus ``_unsafe_view``), bare allocations (``empty*``, ``new_empty*``) and ops that touch no tensor
(``promote_types``). Composite ops are seen as the
aten ops they decompose into. Bytes per op:

- read: every tensor argument except pure ``out=`` arguments and the destination of an overwriting
  in-place op (``copy_``, ``fill_``, ``zero_``); an in-place op like ``add_`` reads its ``self``;
- written: every returned tensor that is not an alias of an argument, plus every argument the schema
  marks as written (in-place ``self``, ``out=``);
- a tensor's bytes are element size × the number of *distinct* elements it addresses: a dimension of
  stride 0 counts once, so a broadcast (expanded) scalar counts its own storage bytes, not the expanded
  size. Python scalars cost nothing (they travel in the launch).

``count_triton(fn, *args, **kwargs)`` runs ``fn`` with Triton's CPU interpreter (TRITON_INTERPRET=1 must
have been set before the kernels were decorated) instrumented at its memory builder: every
``tl.load``/``tl.store`` of every program adds element size × the distinct addresses its active (masked-in)
lanes touch, and every grid launch counts one launch (``ops`` entry ``"triton:<kernel>"``). Distinct
addresses per instruction is what a coalescing memory system fetches: a contiguous load counts every
lane, a per-sample coefficient gathered by a whole block counts once per program. Tensor-descriptor
loads/stores and atomics are not modelled and raise rather than being silently uncounted. The aten ops the
host-side launcher itself dispatches (a ``.contiguous()`` copy, an allocation-free cast, …) are counted as in
``count_eager`` and included, so the totals are the whole call's work; the interpreter's own host<->device
staging copies are not (they do not exist on a GPU).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops that launch nothing although their schema is not a view: fresh-tensor reinterpretation and allocation.
_NO_LAUNCH = {aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
              aten.new_empty_strided,
              # metadata checks functorch runs under torch.func.jvp: they compare shapes, read no data
              aten.is_same_size, aten._has_same_storage_numel}
# In-place ops that overwrite their destination without reading it.
_OVERWRITE = {aten.copy_, aten.fill_, aten.zero_}


def tensor_bytes(t: torch.Tensor) -> int:
    """Element size × distinct elements addressed (dimensions of stride 0 count once)."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size() if t.numel() else 0


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _launches_nothing(func) -> bool:
    return func.is_view or func.overloadpacket in _NO_LAUNCH


def _op_traffic(func, args, kwargs, result) -> tuple[int, int]:
    """(bytes read, bytes written) of one aten op, by its schema (see the module doc)."""
    schema = func._schema
    values = {arg.name: value for arg, value in zip(schema.arguments, args)}
    values.update(kwargs)
    read = written = 0
    for arg in schema.arguments:
        tensors = _tensors(values.get(arg.name))
        size = sum(tensor_bytes(t) for t in tensors)
        writes = arg.alias_info is not None and arg.alias_info.is_write
        if writes:
            written += size
        if not writes or not (arg.kwarg_only or func.overloadpacket in _OVERWRITE):
            read += size
    results = result if isinstance(result, (list, tuple)) else [result]
    for ret, value in zip(schema.returns, results):
        if ret.alias_info is None:
            written += sum(tensor_bytes(t) for t in _tensors(value))
    return read, written


class _Tally:
    """Launches and bytes, with a switch to ignore the interpreter's own staging copies."""

    def __init__(self):
        self.ops: list[str] = []
        self.read = self.written = 0
        self.paused = False

    def add(self, name: str, read: int, written: int) -> None:
        self.ops.append(name)
        self.read += read
        self.written += written

    def result(self) -> dict:
        return {"launches": len(self.ops), "bytes_read": self.read, "bytes_written": self.written,
                "ops": list(self.ops)}


class _AtenCounter(TorchDispatchMode):
    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.tally.paused and not _launches_nothing(func):
            touches_tensors = any(_tensors(v) for v in (*args, *kwargs.values(), result))
            if touches_tensors:         # e.g. aten.promote_types: dtype arithmetic, no kernel
                self.tally.add(str(func), *_op_traffic(func, args, kwargs, result))
        return result


def count_eager(fn: Callable, *args, **kwargs) -> dict:
    """Launches and bytes of the aten ops ``fn(*args, **kwargs)`` dispatches; see the module doc."""
    tally = _Tally()
    with _AtenCounter(tally):
        fn(*args, **kwargs)
    return tally.result()


@contextlib.contextmanager
def _instrumented_interpreter(tally: _Tally):
    """Patch the interpreter's memory builder and grid executor to add each launch's traffic to ``tally``."""
    import triton
    from triton.runtime import interpreter

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("count_triton needs Triton's interpreter: set TRITON_INTERPRET=1 before the kernel "
                           "modules are imported (it is read when a kernel is decorated)")
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    current = {"read": 0, "written": 0}

    def distinct_bytes(ptrs, mask) -> int:
        active = np.broadcast_to(mask.data, ptrs.data.shape)
        element_bytes = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        return int(np.unique(ptrs.data[active]).size) * element_bytes

    def load(self, ptrs, mask, *rest):
        current["read"] += distinct_bytes(ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, *rest)

    def store(self, ptrs, value, mask, *rest):
        current["written"] += distinct_bytes(ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, *rest)

    def launch(self, *args, **kwargs):
        current["read"] = current["written"] = 0
        tally.paused = True                 # the interpreter's host staging copies are not kernel work
        try:
            return originals["__call__"](self, *args, **kwargs)
        finally:
            tally.paused = False
            tally.add(f"triton:{self.fn.__name__}", current["read"], current["written"])

    def uncounted(name):
        def refuse(self, *args, **kwargs):
            raise NotImplementedError(f"count_triton does not count the traffic of {name}")
        return refuse

    patches = {builder: {"create_masked_load": load, "create_masked_store": store},
               executor: {"__call__": launch}}
    for name in ("create_descriptor_load", "create_descriptor_store", "create_descriptor_gather",
                 "create_descriptor_scatter", "create_atomic_rmw", "create_atomic_cas"):
        patches[builder][name] = uncounted(name)
    originals = {name: getattr(cls, name) for cls, members in patches.items() for name in members}
    try:
        for cls, members in patches.items():
            for name, member in members.items():
                setattr(cls, name, member)
        yield
    finally:
        for cls, members in patches.items():
            for name in members:
                setattr(cls, name, originals[name])


def count_triton(fn: Callable, *args, **kwargs) -> dict:
    """Launches and bytes of ``fn(*args, **kwargs)``: its Triton kernels' loads/stores under the interpreter,
    plus the aten ops its host code dispatches; see the module doc."""
    tally = _Tally()
    with _instrumented_interpreter(tally), _AtenCounter(tally):
        fn(*args, **kwargs)
    return tally.result()
