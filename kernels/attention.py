"""Attention for models and for forward-mode AD: the one place that chooses how attention is computed.

- :func:`scaled_dot_product_attention` is what a model calls (the networks in ``engine.models`` do): the
  Triton kernels below under forward-mode AD on CUDA, flash-attn for CUDA half precision when installed,
  PyTorch's SDPA otherwise (its math backend under forward-mode AD, which the fused backends lack).
- :func:`jvp_attention` is softmax(q·kᵀ·scale)·v with a forward-mode rule and a backward, as flash-style
  Triton kernels; ``kernels.patch_sdpa`` routes a model's own SDPA calls to it (:func:`routed_sdpa`).

The rest of this docstring is about the Triton kernels.

Why: MeanFlow / sCM training differentiates the network with ``torch.func.jvp``. Fused attention (SDPA
flash / memory-efficient, flash-attn) has no forward-mode rule, so the fallback is math attention, which
materialises S = scale·q·kᵀ, P = softmax(S) and their tangents dS, dP: four [N, N] matrices per head.
These kernels stream over key blocks with an online softmax and keep only O(N·d) per head in memory.

Math (per query row i; j runs over keys):
    S = scale·q·kᵀ,   dS = scale·(dq·kᵀ + q·dkᵀ),   P = softmax(S),   O = P·v
    dP = P ⊙ (dS − μ),  μ_i = Σ_j P_ij·dS_ij
    dO = dP·v + P·dv = (P ⊙ dS)·v + P·dv − μ ⊙ O
Online, with m the running row max and p = exp(S − m) (all accumulators rescaled by exp(m_old − m_new)
when m grows): l = Σp, acc = Σ p·v, acc_t = Σ p·(dS·v + dv), μ̃ = Σ p·dS, and at the end
O = acc / l, dO = acc_t / l − (μ̃ / l)·O. Given the saved log-sum-exp L, p = exp(S − L) is already P,
so the tangent needs no rescaling and dO = acc_t − μ·O with the saved O.

Kernels (fp32 accumulation; fp32 / fp16 / bf16 IO; any sequence length via masked tails; head dim ≤ 128,
padded to a power of two ≥ 16 for ``tl.dot``; q/k/v/tangents/grad-output may be strided views with a
unit last-dim stride, batch/head offsets are int64):
  _fwd_kernel   MODE 0: O and L (the primal);  MODE 1: O, L and dO in one pass (``attention_jvp``);
                MODE 2: dO only, from the saved O and L (the autograd ``jvp``).
  _bwd_dkdv_kernel, _bwd_dq_kernel: flash-attention backward for O (P recomputed from L).

Under autograd (``JVPAttentionFunction``) forward-mode AD calls ``forward`` and then ``jvp``; ``forward``
cannot see the tangents, so it runs MODE 0 (which the backward needs anyway) and ``jvp`` runs MODE 2,
re-using O and L. Compared with one fused MODE-1 pass this recomputes q·kᵀ once (7 instead of 6 N²·d
matmuls) but never recomputes O, and the plain forward (no tangents) stays the cheap primal kernel.
Callers that hold tangents themselves can call ``attention_jvp`` for the single fused pass.

Gradients flow through the primal output O (what MeanFlow's loss needs: du/dt only enters a stop-gradient
target). Backpropagating through the tangent dO is not implemented and raises rather than returning a
silently wrong gradient. ``torch.vmap`` over these functions is not supported.

This module must not import ``engine``.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from kernels import dispatch

try:  # optional: flash-attn is a CUDA-only build
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:
    _flash_attn_func = None

try:  # triton ships with CUDA builds of torch; a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """a·b with fp32 accumulation. UPCAST (interpreter + bfloat16 only): Triton 3.8's interpreter
        multiplies bfloat16 tiles as their raw uint16 bits, so they are widened to fp32 first, which is
        exact for the products and matches the GPU's bf16 MMA with fp32 accumulation."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _fwd_kernel(Q, K, V, TQ, TK, TV, O, TO, L,
                    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                    s_tqb, s_tqh, s_tqn, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
                    s_ob, s_oh, s_on,
                    H, N_Q, N_KV, HEAD_D, scale, qk_scale,
                    MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program = one query block of one (batch, head). L is the log-sum-exp of S in log2 units
        (the kernel works with exp2 and S·log2 e). O / TO / L are contiguous outputs of this module."""
        pid_bh = tl.program_id(0)   # B·H on axis 0 (up to 2^31 − 1); axes 1 and 2 stop at 65535
        pid_m = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < N_Q
        d_ok = offs_d < HEAD_D
        qmask = m_ok[:, None] & d_ok[None, :]
        io = Q.dtype.element_ty

        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :], mask=qmask, other=0.0)
        l_ptrs = L + pid_bh.to(tl.int64) * N_Q + rows
        if MODE == 2:  # exact P from the saved log-sum-exp: no running max, no rescaling
            m_i = tl.load(l_ptrs, mask=m_ok, other=0.0)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if MODE != 0:
            tq = tl.load(TQ + b * s_tqb + h * s_tqh + rows[:, None] * s_tqn + offs_d[None, :], mask=qmask,
                         other=0.0)
            acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            mu = tl.zeros([BLOCK_M], tl.float32)
            ref = tl.zeros([BLOCK_M], tl.float32)

        for start_n in range(0, N_KV, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < N_KV
            kmask = n_ok[:, None] & d_ok[None, :]
            cols64 = cols.to(tl.int64)
            k = tl.load(K + b * s_kb + h * s_kh + cols64[:, None] * s_kn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + b * s_vb + h * s_vh + cols64[:, None] * s_vn + offs_d[None, :], mask=kmask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            if MODE == 2:
                p = tl.math.exp2(s - m_i[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _dot(p.to(io), v, PREC, UPCAST)
                m_i = m_new
            if MODE != 0:
                tk = tl.load(TK + b * s_tkb + h * s_tkh + cols64[:, None] * s_tkn + offs_d[None, :], mask=kmask,
                             other=0.0)
                tv = tl.load(TV + b * s_tvb + h * s_tvh + cols64[:, None] * s_tvn + offs_d[None, :], mask=kmask,
                             other=0.0)
                ds = (_dot(tq, tl.trans(k), PREC, UPCAST)
                      + _dot(q, tl.trans(tk), PREC, UPCAST)) * scale
                # dO = Σ P·(dS − ref)·v + P·dv − (μ − ref)·O holds for any per-row ref, and only dS − μ
                # matters: a large common row offset in dS (e.g. q·dkᵀ ≈ const) cancels in the end. So the
                # product is formed in fp32 relative to ref, the P-weighted mean of dS over the first key
                # block, before it is rounded to the IO dtype for the tensor-core dot; rounding p·dS itself
                # would leave an error ∝ the offset after μ·O is subtracted (as the backward forms
                # p·(dp − delta) in fp32 before rounding). Masked keys: p = 0 and ds is finite.
                pds = p * ds
                if start_n == 0:
                    p_sum = tl.sum(p, 1)
                    ref = tl.where(p_sum > 0, tl.sum(pds, 1) / p_sum, 0.0)
                pds = pds - p * ref[:, None]
                if MODE == 1:
                    mu = mu * alpha + tl.sum(pds, 1)
                    acc_t = acc_t * alpha[:, None]
                else:
                    mu = mu + tl.sum(pds, 1)
                acc_t += _dot(pds.to(io), v, PREC, UPCAST) + _dot(p.to(io), tv, PREC, UPCAST)

        o_off = b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :]
        if MODE == 2:
            o = tl.load(O + o_off, mask=qmask, other=0.0).to(tl.float32)
            tl.store(TO + o_off, (acc_t - mu[:, None] * o).to(io), mask=qmask)   # mu = μ − ref
        else:
            o = acc / l_i[:, None]
            tl.store(O + o_off, o.to(io), mask=qmask)
            tl.store(l_ptrs, m_i + tl.math.log2(l_i), mask=m_ok)
            if MODE == 1:
                tl.store(TO + o_off, ((acc_t - mu[:, None] * o) / l_i[:, None]).to(io), mask=qmask)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, L, D, DK, DV,
                         s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                         s_gb, s_gh, s_gn,
                         H, N_Q, N_KV, HEAD_D, scale, qk_scale,
                         PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program = one key block: dV = Σ_i Pᵀ·dO, dK = scale·Σ_i dSᵀ·q with dS = P ⊙ (dO·vᵀ − D),
        D_i = rowsum(dO ⊙ O) (precomputed), P recomputed from the saved log2 log-sum-exp L."""
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        cols = offs_n.to(tl.int64)
        n_ok = offs_n < N_KV
        d_ok = offs_d < HEAD_D
        kmask = n_ok[:, None] & d_ok[None, :]
        io = Q.dtype.element_ty

        k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + offs_d[None, :], mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        row0 = pid_bh.to(tl.int64) * N_Q
        for start_m in range(0, N_Q, BLOCK_M):
            rm = start_m + offs_m
            m_ok = rm < N_Q
            rows = rm.to(tl.int64)
            qmask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :], mask=qmask, other=0.0)
            do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_don + offs_d[None, :], mask=qmask,
                         other=0.0)
            lse = tl.load(L + row0 + rows, mask=m_ok, other=0.0)
            delta = tl.load(D + row0 + rows, mask=m_ok, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            p = tl.where(m_ok[:, None] & n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(io)), do, PREC, UPCAST)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(io)), q, PREC, UPCAST)
        g_off = b * s_gb + h * s_gh + cols[:, None] * s_gn + offs_d[None, :]
        tl.store(DK + g_off, (dk * scale).to(io), mask=kmask)
        tl.store(DV + g_off, dv.to(io), mask=kmask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, L, D, DQ,
                       s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                       s_gb, s_gh, s_gn,
                       H, N_Q, N_KV, HEAD_D, scale, qk_scale,
                       PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program = one query block: dQ = scale·Σ_j dS·k (a separate pass, so no atomics)."""
        pid_bh = tl.program_id(0)   # B·H on axis 0 (up to 2^31 − 1); axes 1 and 2 stop at 65535
        pid_m = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < N_Q
        d_ok = offs_d < HEAD_D
        qmask = m_ok[:, None] & d_ok[None, :]
        io = Q.dtype.element_ty

        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_don + offs_d[None, :], mask=qmask, other=0.0)
        row0 = pid_bh.to(tl.int64) * N_Q
        lse = tl.load(L + row0 + rows, mask=m_ok, other=0.0)
        delta = tl.load(D + row0 + rows, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N_KV, BLOCK_N):
            cn = start_n + offs_n
            n_ok = cn < N_KV
            cols = cn.to(tl.int64)
            kmask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + offs_d[None, :], mask=kmask, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(io), k, PREC, UPCAST)
        g_off = b * s_gb + h * s_gh + rows[:, None] * s_gn + offs_d[None, :]
        tl.store(DQ + g_off, (dq * scale).to(io), mask=qmask)

    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
else:
    INTERPRETED = False


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------
def _config(kind: str, head_dim: int, dtype: torch.dtype = torch.float16) -> dict:
    """Block sizes, warps and stages per kernel.

    On the GPU these are starting points for sm_90 (H100) from the usual flash-attention choices, not
    autotuned here (there is no GPU on the development machines), checked by compiling for sm_90 / sm_80
    with Triton's bundled ptxas: the primal forward keeps one [BLOCK_M, d] accumulator, so it affords
    128-row blocks; the tangent passes add a tangent accumulator and three tangent tiles, so they use 64
    rows and 8 warps (with 4 warps the fp16/bf16 tangent kernels hit 255 registers and spill 176–504 B
    per thread); d = 128 halves the key block to stay within registers.

    float32 IO (``tf32x3`` dots, see ``_dot_flags``) has 4-byte tiles that tf32x3 splits in two: the
    16-bit configs would need 131–266 KB of shared memory, beyond an A100's (sm_80) 166,912 B per block,
    so fp32 gets small tiles and few stages: at most 163,840 B (fp32 tangent pass, d = 128) and ≤ 82 KB
    elsewhere, compiled for sm_80 and sm_90. At d ≤ 64 they spill ≤ 64 B per thread on sm_90; at d = 128
    the tangent kernels still spill 0.4–1 KB per thread on sm_90 and 12–14 KB on sm_80 (where tf32x3 runs
    on mma.sync): fp32 attention is the slow path; use bf16/fp16 for speed.
    Under the interpreter a single small config is used, with BLOCK_M ≠ BLOCK_N so that index mix-ups
    between the query and key axes cannot cancel out in tests.
    """
    if INTERPRETED:
        m, n = {"fwd": (32, 16), "fwd_t": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind]
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=1)
    big = head_dim > 64
    if dtype == torch.float32:
        return {
            "fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
            "fwd_t": dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1),
            "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
            "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
        }[kind]
    return {
        "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if big else 4, num_stages=3),
        "fwd_t": dict(BLOCK_M=64, BLOCK_N=32 if big else 64, num_warps=8, num_stages=2),
        "dkdv": dict(BLOCK_M=32 if big else 64, BLOCK_N=64, num_warps=4 if not big else 8, num_stages=2),
        "dq": dict(BLOCK_M=64, BLOCK_N=32 if big else 64, num_warps=4 if not big else 8, num_stages=2),
    }[kind]


MAX_GRID_AXIS1 = 65535   # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2^31 − 1)


def _grid(blocks: int, batch_heads: int) -> tuple[int, int]:
    """Launch grid of every kernel here: (B·H, blocks along the sequence). B·H goes on axis 0, whose
    limit is 2^31 − 1, because it grows with the batch (70,000 = 4,375 × 16 heads overflows axis 1);
    the block count stays small (65,535 blocks of ≥ 16 rows is > 10^6 tokens)."""
    if blocks > MAX_GRID_AXIS1 or batch_heads > 2**31 - 1:
        raise ValueError(f"jvp_attention (triton): grid ({batch_heads}, {blocks}) exceeds CUDA's limits "
                         f"(2^31 − 1, {MAX_GRID_AXIS1}); the sequence is too long for one launch")
    return batch_heads, blocks


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make t's device current for the launch (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_flags(dtype: torch.dtype) -> dict:
    """PREC: fp32 IO uses ``tf32x3`` (each operand split into a TF32 high part and a TF32 remainder, three
    tensor-core MMAs: close to fp32 accuracy, unlike plain TF32, Triton's default). ``ieee`` would match
    PyTorch's fp32 matmul bit for bit in spirit but has no tensor-core path on sm_80/sm_90: it lowers to
    unrolled scalar FMAs with 7–16 KB of stack per thread. fp16/bf16 use tensor cores either way (PREC is
    ignored for them). The interpreter accepts ``tf32x3`` and computes the dot in plain fp32.
    UPCAST: see ``_dot``."""
    return dict(PREC="tf32x3" if dtype == torch.float32 else "tf32",
                UPCAST=INTERPRETED and dtype == torch.bfloat16)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride and the head dim contiguously: copy only when stride(-1) != 1
    (e.g. an expanded zero tangent); permuted views of a qkv projection pass through as they are."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def triton_unavailable(device: torch.device) -> str | None:
    """Why the triton kernels cannot run on ``device`` in this process, or None if they can."""
    if triton is None:
        return "the triton kernels need the `triton` package, which is not installed"
    if device.type != "cuda" and not INTERPRETED:
        return (f"triton on {device.type} tensors needs TRITON_INTERPRET=1 set before the kernels are defined "
                "(before importing kernels.attention); on CPU use attention=torch or auto")
    return None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the triton kernels cannot take these inputs (shapes, dtypes), or None if they can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected [B, heads, N, d] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return (f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}: need equal batch and heads, one head "
                "dim for q, k and v, and k, v of one shape")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} is outside the kernels' 1..{MAX_HEAD_DIM}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty sequence"
    if q.dtype not in _IO_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernels take one of float32, float16, bfloat16 "
                "for all of q, k, v")
    if not q.device == k.device == v.device:
        return "q, k, v are on different devices"
    return None


def check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise RuntimeError if triton cannot run here, ValueError for inputs the kernels cannot take."""
    reason = triton_unavailable(q.device)
    if reason is not None:
        raise RuntimeError(f"jvp_attention (triton): {reason}")
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"jvp_attention (triton): {reason}")


def _fwd(q, k, v, scale, mode, tangents=None, o=None, lse=None):
    """Launch ``_fwd_kernel``; returns (o, lse, do) with None for what the mode does not produce."""
    B, H, n_q, d = q.shape
    n_kv = k.shape[2]
    q, k, v = map(_unit_last, (q, k, v))
    if mode == 2:
        tq, tk, tv = map(_unit_last, tangents)
        do = torch.empty_like(o)
    else:
        o = torch.empty((B, H, n_q, d), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
        if mode == 1:
            tq, tk, tv = map(_unit_last, tangents)
            do = torch.empty_like(o)
        else:  # the tangent pointers are never read in MODE 0
            tq, tk, tv, do = q, k, v, o
    cfg = _config("fwd" if mode == 0 else "fwd_t", d, q.dtype)
    grid = _grid(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)
    with _on_device(q):
        _fwd_kernel[grid](q, k, v, tq, tk, tv, o, do, lse,
                          *_strides3(q), *_strides3(k), *_strides3(v),
                          *_strides3(tq), *_strides3(tk), *_strides3(tv), *_strides3(o),
                          H, n_q, n_kv, d, scale, scale * _LOG2E,
                          MODE=mode, **_dot_flags(q.dtype), BLOCK_D=_block_d(d), **cfg)
    return (None if mode == 2 else o), (None if mode == 2 else lse), (None if mode == 0 else do)


def _bwd(q, k, v, o, lse, grad_o, scale):
    B, H, n_q, d = q.shape
    n_kv = k.shape[2]
    q, k, v, grad_o = map(_unit_last, (q, k, v, grad_o))
    delta = (grad_o.float() * o.float()).sum(-1).contiguous()  # D_i = rowsum(dO ⊙ O), [B, H, N_q] fp32
    dq = torch.empty((B, H, n_q, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, n_kv, d), device=q.device, dtype=q.dtype)
    dv = torch.empty_like(dk)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_o))
    tail = (H, n_q, n_kv, d, scale, scale * _LOG2E)
    with _on_device(q):
        cfg = _config("dkdv", d, q.dtype)
        _bwd_dkdv_kernel[_grid(triton.cdiv(n_kv, cfg["BLOCK_N"]), B * H)](
            q, k, v, grad_o, lse, delta, dk, dv, *common, *_strides3(dk), *tail,
            **_dot_flags(q.dtype), BLOCK_D=_block_d(d), **cfg)
        cfg = _config("dq", d, q.dtype)
        _bwd_dq_kernel[_grid(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)](
            q, k, v, grad_o, lse, delta, dq, *common, *_strides3(dq), *tail,
            **_dot_flags(q.dtype), BLOCK_D=_block_d(d), **cfg)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class _AttentionTangent(torch.autograd.Function):
    """dO from the saved O and log-sum-exp (kernel MODE 2). An autograd.Function of its own so that a
    backward through the tangent (which would need second-order terms) fails loudly instead of
    returning a partial gradient."""

    @staticmethod
    def forward(q, k, v, o, lse, tq, tk, tv, scale):
        return _fwd(q, k, v, scale, 2, tangents=(tq, tk, tv), o=o, lse=lse)[2]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("jvp_attention (triton): backpropagating through the attention tangent is not "
                           "supported; detach the tangent (MeanFlow / sCM use it only inside a stop-gradient "
                           "target) or use attention=torch")


class JVPAttentionFunction(torch.autograd.Function):
    """(q, k, v, scale) -> (O, log2-sum-exp); use ``jvp_attention`` rather than calling this directly.

    ``forward`` / ``setup_context`` are separate because functorch transforms (``torch.func.jvp``)
    require it. The log-sum-exp is an output (marked non-differentiable) because with ``setup_context``
    only inputs and outputs can be saved.
    """

    @staticmethod
    def forward(q, k, v, scale):
        o, lse, _ = _fwd(q, k, v, scale, 0)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _scale):
        q, k, v, o, lse = ctx.saved_tensors
        return _AttentionTangent.apply(q, k, v, o, lse, tq, tk, tv, ctx.scale), None

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, o, lse, grad_o, ctx.scale)
        return dq, dk, dv, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Math attention in plain torch ops (the ``torch`` implementation): supports jvp, backward and vmap
    natively, and materialises the [N, N] matrices (and, under jvp, their tangents)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The implementation ``jvp_attention`` runs for these inputs: the forced one, or under ``auto``
    triton for CUDA tensors the kernels support and torch otherwise (e.g. head dim > 128, float64)."""
    impl = dispatch.policy("attention")
    if impl == dispatch.AUTO:
        ok = q.is_cuda and triton_unavailable(q.device) is None and unsupported_reason(q, k, v) is None
        return "triton" if ok else "torch"
    return impl


def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v for [B, heads, N, d] tensors (scale defaults to 1/√d), differentiable in
    both modes: ``torch.func.jvp`` / ``torch.autograd.forward_ad`` and ``backward``.

    The implementation follows ``kernels.dispatch`` (op ``attention``) and is recorded there. Forcing
    ``triton`` on CPU tensors needs TRITON_INTERPRET=1 (slow; meant for tests) and raises otherwise.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if attention_impl(q, k, v) == "torch":
        dispatch.record("attention", "torch")
        return attention_reference(q, k, v, scale)
    check_triton_inputs(q, k, v)
    dispatch.record("attention", "triton")
    return JVPAttentionFunction.apply(q, k, v, scale)[0]


def attention_jvp(q, k, v, tq, tk, tv, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, dO) for explicit tangents in one fused online-softmax pass (kernel MODE 1), without autograd:
    for code that propagates tangents itself. Triton only; inputs are not differentiated through."""
    check_triton_inputs(q, k, v)
    check_triton_inputs(tq, tk, tv)
    if (tq.shape, tk.shape, tv.shape) != (q.shape, k.shape, v.shape) or tq.dtype != q.dtype:
        raise ValueError("tangents must have the shapes and dtype of q, k, v")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        o, _, do = _fwd(q, k, v, scale, 1, tangents=(tq, tk, tv))
    return o, do


class JVPAttention(nn.Module):
    """``jvp_attention`` as a module with a fixed scale (None: 1/√d), e.g. for ``SelfAttention.attn_fn``."""

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp_attention(q, k, v, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


# --------------------------------------------------------------------------------------------------
# The choice: what a model's attention runs, and which SDPA calls a patched model routes here
# --------------------------------------------------------------------------------------------------
def forward_ad_active(*tensors: torch.Tensor) -> bool:
    """True under torch.func transforms or when a tensor carries a forward-AD tangent."""
    return torch._C._are_functorch_transforms_active() or any(
        fwAD.unpack_dual(t).tangent is not None for t in tensors)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for [B, heads, N, d] tensors, by the fastest path that is right here.

    ``kernels.dispatch`` op ``attention`` chooses. ``triton`` runs :func:`jvp_attention`'s kernels, which
    have a forward-mode (``torch.func.jvp``) and a backward rule and never materialise the [N, N] matrix.
    ``auto`` takes them on CUDA only under forward-mode AD (MeanFlow's jvp), for inputs they take
    (fp32/fp16/bf16, head dim ≤ 128): everywhere else the tuned SDPA / flash-attn kernels are faster and
    need no forward-mode rule. On the ``torch`` path the fused SDPA and flash-attn kernels have no
    forward-mode AD, so under jvp the math SDPA backend is forced; otherwise flash-attn is used on CUDA half
    precision when installed, SDPA's own choice elsewhere.
    """
    forward_ad = forward_ad_active(q, k, v)
    if attention_impl(q, k, v) == "triton" and (forward_ad or dispatch.policy("attention") == "triton"):
        return jvp_attention(q, k, v)   # records "triton"
    dispatch.record("attention", "torch")
    if forward_ad:
        return math_sdpa(q, k, v)
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


# Per thread: the patched forwards (kernels.patch_sdpa) running, innermost last, each as whether it routes
# plain (non-jvp) calls too; only calls inside one are routed.
_patched = threading.local()


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's math backend, which has a forward-mode rule, called directly: ``sdpa_kernel`` would switch
    backends for every thread of the process. Boolean masks become additive (True = take part), as
    ``F.scaled_dot_product_attention`` does before it picks a backend."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


def routed_sdpa(original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """An ``F.scaled_dot_product_attention`` call from inside a patched forward.

    Under forward-mode AD (``torch.func.jvp``): to :func:`jvp_attention` when it implements the arguments,
    else to :func:`math_sdpa` (masks, dropout, causal, GQA, and, when the triton kernels would run,
    inputs they do not take), since the fused backends have no forward-mode rule. Plain forward and
    backward calls keep ``original`` (flash / cuDNN), unless the patch routes plain calls too. Calls from
    a thread outside a patched forward always go to ``original``. What ran inside a patched forward is
    recorded (``attention``: ``triton`` or ``torch``)."""
    stack = getattr(_patched, "stack", None)
    args = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if not stack:
        return original(query, key, value, **args)
    forward_ad = forward_ad_active(query, key, value)
    routed = (forward_ad or stack[-1]) and attn_mask is None and dropout_p == 0.0 and not is_causal \
        and not enable_gqa
    if routed and attention_impl(query, key, value) == "triton":
        routed = unsupported_reason(query, key, value) is None
    if routed:
        return jvp_attention(query, key, value, scale)
    dispatch.record("attention", "torch")
    if forward_ad:
        return math_sdpa(query, key, value, **args)
    return original(query, key, value, **args)


def enter_patched_forward(route_plain_calls: bool) -> None:
    if not hasattr(_patched, "stack"):
        _patched.stack = []
    _patched.stack.append(route_plain_calls)


def exit_patched_forward() -> None:
    _patched.stack.pop()


__all__ = ["JVPAttention", "JVPAttentionFunction", "attention_impl", "attention_jvp", "attention_reference",
           "check_triton_inputs", "forward_ad_active", "jvp_attention", "math_sdpa", "routed_sdpa",
           "scaled_dot_product_attention", "triton_unavailable", "unsupported_reason", "MAX_HEAD_DIM"]
