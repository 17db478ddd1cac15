"""One fused multistep DPM-Solver++ update: x_next = a·x + b0·D0 + b1·D1 + b2·D2 in one pass.

Why a kernel: a multistep DPM-Solver++ step of order k (data prediction) is a linear combination of the
state and the last k denoiser outputs once its φ-function coefficients are expanded on the host (in
float64, where their cancellations are harmless). Eager PyTorch evaluates that combination as a chain of
casts, multiplies and adds, each a kernel launch that reads and writes a whole tensor; the fused step reads
each input once and writes each output once — k + 1 reads and one write (two with the trajectory-slot
store). A CMT rollout (CMT paper Eq. 7) runs N such steps per batch of trajectories and keeps every state, so the
kernel can also store x_next a second time straight into a preallocated pair/trajectory buffer slot.

Layers (Liger-Kernel style), each usable on its own:

- ``_dpm_solver_step_kernel``: the ``@triton.jit`` kernel over flat element offsets;
- ``dpm_solver_step_triton``: the launcher (validation, host-side layout, grid, launch config);
- ``dpm_solver_step_torch``: the pure-PyTorch reference with identical semantics;
- ``dpm_solver_pp_step``: the functional API that picks one via ``kernels.dispatch`` (op
  ``dpm_solver_step``) and records what ran.

Semantics shared by both implementations:

- ``D1``/``D2`` may be None (order 1 or 2); a missing output's coefficient is ignored, never read.
- ``coeffs = (a, b0, b1, b2)``: four floats (0-d tensors count as floats) or four [B] tensors, one value
  per sample of the leading dimension (B = x.shape[0]); per-sample values are applied to sample
  ``offset // (x.numel() // B)``.
- Arithmetic in float32 for float16/bfloat16/float32 inputs (float64 for float64 inputs, which only the
  torch reference handles), rounded once into the output dtype: ``x.dtype``, or ``out.dtype``/``slot.dtype``.
- ``out``: where to write x_next (``out=x`` updates in place; ``out`` may also be one of the D's); otherwise
  a new tensor. ``slot``: a second destination of x_next with x's shape, e.g. ``buffer[:, i]`` of a
  [B, N, ...] buffer — each sample must be contiguous, the batch stride is free.

Triton path layout rules (what is copied, stated so the counted work is honest): inputs that are not
contiguous are made contiguous on the host (one extra read and write each, visible to
``benchmarks.counting``); ``out`` must be contiguous (it is written, so it cannot be replaced by a copy);
``slot`` must be contiguous within each sample. All element offsets are int64, so tensors with more than
2^31 elements index correctly. No autograd: the rollout runs under ``no_grad``, and a forced Triton call on
inputs that require grad raises instead of returning a silently detached result.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from kernels import dispatch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the torch reference stays usable where Triton is not installed
    triton = None

OP = "dpm_solver_step"
# Dtypes the kernel reads and writes. float64 is left to the torch reference: it exists for exactness
# tests, where an fp32-accumulating kernel would be the wrong tool, and sm_90 float64 throughput is low.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Offsets relative to a sample's start are divided in int32 while per_sample + BLOCK stays below this
# (a module constant so that tests can force the int64 path on small tensors).
_INT32_LIMIT = 2**31

if triton is not None:

    @triton.jit
    def _dpm_solver_step_kernel(x_ptr, d0_ptr, d1_ptr, d2_ptr, out_ptr, slot_ptr,
                                a, b0, b1, b2,
                                numel, per_sample, slot_batch_stride,
                                ORDER: tl.constexpr, PER_SAMPLE: tl.constexpr, STORE_SLOT: tl.constexpr,
                                SAMPLE_I32: tl.constexpr, BLOCK: tl.constexpr):
        """x_next over BLOCK flat elements; a..b2 are floats, or contiguous [B] pointers when PER_SAMPLE.

        Offsets are int64 from the program id on, so every pointer offset (and the sample index derived
        from it) is 64-bit. D1/D2 are only touched when ORDER needs them (constexpr branches).

        Sample index: a 64-bit integer division has no hardware instruction (it is a ~70-instruction
        software routine per element), so the program divides its int64 start offset once, as a scalar,
        and each element divides only its int32 offset relative to that sample's start. SAMPLE_I32 (set by
        the launcher when per_sample + BLOCK < 2^31) guarantees that relative offset fits in int32; otherwise
        (a single sample of ≥ 2^31 - BLOCK elements) the per-element division stays int64.
        """
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        if PER_SAMPLE or STORE_SLOT:
            if SAMPLE_I32:
                first = start // per_sample                                  # one scalar int64 division
                rel = (start - first * per_sample).to(tl.int32) + tl.arange(0, BLOCK)  # < per_sample + BLOCK
                n32 = tl.cast(per_sample, tl.int32)     # per_sample may arrive as the constexpr 1
                step = rel // n32                                            # int32 division per element
                inner = rel - step * n32
                sample = first + step.to(tl.int64)
            else:
                sample = offs // per_sample
                inner = offs - sample * per_sample
        if PER_SAMPLE:
            ca = tl.load(a + sample, mask=mask).to(tl.float32)
            cb0 = tl.load(b0 + sample, mask=mask).to(tl.float32)
        else:
            ca = a
            cb0 = b0
        acc = ca * tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        acc += cb0 * tl.load(d0_ptr + offs, mask=mask).to(tl.float32)
        if ORDER >= 2:
            if PER_SAMPLE:
                cb1 = tl.load(b1 + sample, mask=mask).to(tl.float32)
            else:
                cb1 = b1
            acc += cb1 * tl.load(d1_ptr + offs, mask=mask).to(tl.float32)
        if ORDER >= 3:
            if PER_SAMPLE:
                cb2 = tl.load(b2 + sample, mask=mask).to(tl.float32)
            else:
                cb2 = b2
            acc += cb2 * tl.load(d2_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if STORE_SLOT:
            slot_offs = sample * slot_batch_stride + inner.to(tl.int64)
            tl.store(slot_ptr + slot_offs, acc.to(slot_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return triton is not None and isinstance(_dpm_solver_step_kernel, InterpretedFunction)


def launch_config() -> tuple[int, int]:
    """(BLOCK, num_warps).

    GPU (chosen for sm_90, not tuned by measurement — no GPU here): a memory-bound stream of up to 4 inputs
    wants bytes in flight, not occupancy tricks. 1024 elements over 4 warps is 8 elements per thread, i.e.
    two 16-byte vector loads per input stream for fp32 (one for 16-bit), ~16 KB per program for order 3;
    with up to 16 resident 128-thread programs per SM that is far above the ~15 KB/SM an H100 needs in flight
    to cover DRAM latency, and 1024 programs for a B=64 SD latent batch fill 132 SMs ~8 times over.
    Interpreter: the same block (no autotuning there; one config keeps tests deterministic and each
    interpreted program a vectorised numpy step).
    """
    return 1024, 4


# --------------------------------------------------------------------------------------------------
# Argument checks shared by both paths
# --------------------------------------------------------------------------------------------------
def _outputs(x, D0, D1, D2) -> tuple[int, list]:
    if D0 is None:
        raise ValueError("D0 (the current denoiser output) is required")
    if D2 is not None and D1 is None:
        raise ValueError("D2 given without D1: order 3 needs both previous outputs")
    ds = [d for d in (D0, D1, D2) if d is not None]
    for name, d in zip(("D0", "D1", "D2"), ds):
        if d.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(d.shape)}, x has {tuple(x.shape)}: no broadcasting here")
        if d.device != x.device:
            raise ValueError(f"{name} is on {d.device}, x on {x.device}")
    return len(ds), ds


def _coefficients(coeffs: Sequence, x: torch.Tensor):
    """Four floats (0-d tensors become floats), or four contiguous [B] float64 tensors on x's device
    (float64 is what the kernel reads; it converts each to float32 once per element, like the reference)."""
    if len(coeffs) != 4:
        raise ValueError(f"coeffs must be (a, b0, b1, b2), got {len(coeffs)} values")
    if not any(isinstance(c, torch.Tensor) and c.ndim > 0 for c in coeffs):
        return tuple(float(c) for c in coeffs), False
    batch = x.shape[0] if x.ndim else 1
    per_sample = []
    for c in coeffs:
        c = torch.as_tensor(c, dtype=torch.float64, device=x.device)
        if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != batch):
            raise ValueError(f"per-sample coefficients must be [B] = [{batch}], got shape {tuple(c.shape)}")
        # Always a fresh contiguous [B]: the kernel reads coefficient ``sample`` at ``pointer + sample``
        # (stride 1), so a strided view such as ``coeffs[::2]`` must be copied, not passed through.
        per_sample.append(c.expand(batch).contiguous())
    return tuple(per_sample), True


def _check_destination(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if t is None:
        return
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _sample_contiguous(t: torch.Tensor) -> bool:
    """Each sample t[b] is one contiguous block (the batch stride is free): the layout a slot must have."""
    return t.ndim > 0 and (t.shape[0] == 0 or t[0].is_contiguous())


def _partially_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Contiguous a and b share some but not all memory (exact aliasing, e.g. out=x, is fine elementwise)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    same = a0 == b0 and a1 == b1 and a.dtype == b.dtype
    return not same and a0 < b1 and b0 < a1


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------
def dpm_solver_step_torch(x: torch.Tensor, D0: torch.Tensor, D1: Optional[torch.Tensor] = None,
                          D2: Optional[torch.Tensor] = None, *, coeffs: Sequence,
                          out: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: the combination as eager ops in float32 (float64 for float64 x), cast back once.

    Works for any dtype, device, layout and autograd. ``out``/``slot`` receive a copy of the result, so in
    place (``out=x``) is safe here by construction.
    """
    _, ds = _outputs(x, D0, D1, D2)
    _check_destination("out", out, x)
    _check_destination("slot", slot, x)
    values, per_sample = _coefficients(coeffs, x)
    acc = torch.promote_types(x.dtype, torch.float32)
    if per_sample:
        values = [c.to(acc).view(-1, *[1] * (x.ndim - 1)) for c in values]
    result = values[0] * x.to(acc)
    for c, d in zip(values[1:], ds):
        result = result + c * d.to(acc)
    if slot is not None:
        slot.copy_(result)
    if out is not None:
        return out.copy_(result)
    return result.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton launcher
# --------------------------------------------------------------------------------------------------
def triton_unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """Why the Triton kernel cannot run on tensors like ``x`` here, or None if it can."""
    if triton is None:
        return "Triton is not installed"
    if x.dtype not in KERNEL_DTYPES:
        return f"the kernel handles {', '.join(map(str, KERNEL_DTYPES))}, not {x.dtype} (use the torch reference)"
    if not x.is_cuda and not interpreted():
        return (f"x is on {x.device}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "kernels.dpm_solver_step is first imported (the flag is read when the kernel is decorated)")
    return None


def dpm_solver_step_triton(x: torch.Tensor, D0: torch.Tensor, D1: Optional[torch.Tensor] = None,
                           D2: Optional[torch.Tensor] = None, *, coeffs: Sequence,
                           out: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the fused kernel: one read of each input, one write of ``out`` (and one of ``slot``)."""
    reason = triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"dpm_solver_step: cannot run the Triton kernel: {reason}")
    _, ds = _outputs(x, D0, D1, D2)
    _check_destination("out", out, x)
    _check_destination("slot", slot, x)
    for name, t in [("x", x), *zip(("D0", "D1", "D2"), ds)]:
        if t.dtype not in KERNEL_DTYPES:
            raise RuntimeError(f"dpm_solver_step: the Triton kernel does not read {t.dtype} ({name}); "
                               "use the torch reference")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ds)):
        raise RuntimeError("dpm_solver_step: the Triton kernel has no backward; run it under torch.no_grad(), "
                           "or use the torch reference (dispatch policy 'torch' or 'auto') to differentiate")
    for name, t in (("out", out), ("slot", slot)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise RuntimeError(f"dpm_solver_step: the Triton kernel does not write {t.dtype} ({name})")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif not out.is_contiguous():
        raise ValueError("dpm_solver_step: out must be contiguous for the Triton kernel (it is written in place); "
                         "pass a contiguous buffer, or a strided destination as slot=")
    values, per_sample = _coefficients(coeffs, x)
    if x.numel() == 0:
        return out
    per_sample_numel = x.numel() // x.shape[0] if x.ndim else 1
    slot_batch_stride = 0
    if slot is not None:
        if not _sample_contiguous(slot):
            raise ValueError("dpm_solver_step: slot must be contiguous within each sample (slot[0].is_contiguous()); "
                             f"got strides {slot.stride()}")
        slot_batch_stride = slot.stride(0)
    # Host-side layout: contiguous flat inputs. A non-contiguous input costs one copy, made here and counted.
    x_c, *ds_c = (t.contiguous() for t in (x, *ds))
    for name, t in zip(("x", "D0", "D1", "D2"), (x_c, *ds_c)):
        if _partially_overlaps(out, t):
            raise ValueError(f"dpm_solver_step: out overlaps {name} without being the same tensor: "
                             "programs would read elements other programs already overwrote")
    block, num_warps = launch_config()
    grid = (triton.cdiv(x.numel(), block),)
    args = _kernel_args(x_c, ds_c, out, slot, values, per_sample, x.numel(), per_sample_numel, slot_batch_stride)
    # Triton launches on the current CUDA device, not the tensors' one: make x's device current.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dpm_solver_step_kernel[grid](**args, num_warps=num_warps)
    return out


def _kernel_args(x, ds, out, slot, values, per_sample: bool, numel: int, per_sample_numel: int,
                 slot_batch_stride: int) -> dict:
    """The kernel's arguments by name, as the launcher passes them; ``compile_specs`` builds its launches
    here too, so the compile check sees the specialization a real launch gets."""
    block, _ = launch_config()
    d0, d1, d2 = [*ds, *[x] * (3 - len(ds))]   # placeholders for unread outputs: the kernel never touches them
    a, b0, b1, b2 = values
    return dict(x_ptr=x, d0_ptr=d0, d1_ptr=d1, d2_ptr=d2, out_ptr=out, slot_ptr=out if slot is None else slot,
                a=a, b0=b0, b1=b1, b2=b2, numel=numel, per_sample=per_sample_numel,
                slot_batch_stride=slot_batch_stride, ORDER=len(ds), PER_SAMPLE=per_sample,
                STORE_SLOT=slot is not None, SAMPLE_I32=per_sample_numel + block < _INT32_LIMIT, BLOCK=block)


# (case, order, per-sample coefficients + slot store, [B, per-sample numel]): an SD-latent batch of
# 64 × 4×64×64 as the sampler (scalar coefficients) and the CMT rollout (per-sample, pair-buffer slot of N=16)
# launch it; one sample of 2^31 elements (the int64 sample-index path); a numel that is no multiple of 16.
_COMPILE_CASES = (("order 1", 1, False, (64, 4 * 64 * 64)), ("order 3", 3, False, (64, 4 * 64 * 64)),
                  ("order 3 per-sample+slot", 3, True, (64, 4 * 64 * 64)),
                  ("order 3 per-sample+slot int64-index", 3, True, (1, 2**31)),
                  ("order 3 numel%16!=0", 3, False, (3, 3 * 33 * 33)))


def compile_specs() -> list:
    """The launches the launcher makes, for ``kernels.compiling`` (sm_90 compile check): each case of
    ``_COMPILE_CASES`` for float16, bfloat16 and float32 IO, at ``launch_config()`` and Triton's default
    num_stages (the launcher passes none)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    from kernels.compiling import CompileSpec, Pointer, launch_specialization

    _, num_warps = launch_config()
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for case, order, rollout, (batch, per_sample_numel) in _COMPILE_CASES:
            x = Pointer(dtype)
            values = (Pointer(torch.float64),) * 4 if rollout else (0.829, 1.63, -1.12, 0.661)
            slot = Pointer(dtype) if rollout else None
            args = _kernel_args(x, [x] * order, x, slot, values, rollout, batch * per_sample_numel,
                                per_sample_numel, 16 * per_sample_numel if rollout else 0)
            signature, constexprs, attrs = launch_specialization(_dpm_solver_step_kernel, args)
            specs.append(CompileSpec(f"dpm step {case} {str(dtype).removeprefix('torch.')} B={batch}",
                                     _dpm_solver_step_kernel, signature, constexprs, num_warps=num_warps,
                                     num_stages=CUDAOptions.num_stages, io_dtype=dtype, attrs=attrs))
    return specs


# --------------------------------------------------------------------------------------------------
# Functional API with dispatch
# --------------------------------------------------------------------------------------------------
def dpm_solver_pp_step(x: torch.Tensor, D0: torch.Tensor, D1: Optional[torch.Tensor] = None,
                       D2: Optional[torch.Tensor] = None, *, coeffs: Sequence,
                       out: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_next = a·x + b0·D0 (+ b1·D1 (+ b2·D2)), the expanded multistep DPM-Solver++ step; see the module doc.

    Implementation (``kernels.dispatch`` op ``dpm_solver_step``): ``auto`` runs Triton for CUDA tensors of a
    kernel dtype when Triton is installed, no input needs a gradient and ``out``/``slot`` have a layout the
    kernel writes (see the module doc), the torch reference otherwise;
    forcing ``triton`` where it cannot run raises. ``dispatch.last_implementation("dpm_solver_step")`` says
    which one ran.
    """
    impl = dispatch.policy(OP)
    if impl == dispatch.AUTO:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, D0, D1, D2))
        usable = (x.is_cuda and triton_unavailable_reason(x) is None and not needs_grad
                  and all(t is None or t.dtype in KERNEL_DTYPES for t in (D0, D1, D2, out, slot))
                  and (out is None or out.is_contiguous()) and (slot is None or _sample_contiguous(slot)))
        impl = "triton" if usable else "torch"
    fn = dpm_solver_step_triton if impl == "triton" else dpm_solver_step_torch
    result = fn(x, D0, D1, D2, coeffs=coeffs, out=out, slot=slot)
    dispatch.record(OP, impl)
    return result
