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

Kernels (fp32 accumulation; fp32 / fp16 / bf16 IO; any sequence length via masked tails; an optional
key-padding mask; q/k/v/tangents/grad-output may be strided views with a unit last-dim stride, offsets
are int64). The head dim (≤ 128) is a compile-time constant, split as a power-of-two chunk plus a
power-of-two tail, each ≥ 16 for ``tl.dot`` (72 = 64 + 16, see ``_head_split``); where every tensor's
strides allow, rows are indexed in 16-byte units so loads are vectorised (``_vec``). One launch axis,
the blocks of one (batch, head) consecutive (``_grid``).
  _fwd_kernel   MODE 0: O and L (the primal);  MODE 1: O, L and dO in one pass (``attention_jvp``);
                MODE 2: dO only, from the saved O and L (the autograd ``jvp``).
  _delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel: flash-attention backward for O (P recomputed from L),
                each pass run only for the gradients autograd asks for.

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
    def _tile(ptr, base, rows, row_ok, stride, VEC: tl.constexpr, cols, HEAD_D: tl.constexpr):
        """Rows ``rows`` × head-dim columns ``cols`` of one (batch, head) of a [B, H, N, d] tensor. Strides
        arrive divided by VEC (a constexpr), so the compiler knows each row starts 16-byte aligned and
        loads vectors; columns past HEAD_D (the tail chunk's padding) read as 0."""
        mask = row_ok[:, None] & (cols < HEAD_D)[None, :]
        return tl.load(ptr + base + rows[:, None] * (stride * VEC) + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _put(ptr, base, rows, row_ok, stride, VEC: tl.constexpr, cols, HEAD_D: tl.constexpr, value):
        mask = row_ok[:, None] & (cols < HEAD_D)[None, :]
        tl.store(ptr + base + rows[:, None] * (stride * VEC) + cols[None, :], value, mask=mask)

    @triton.jit
    def _program(n, BLOCK: tl.constexpr, H):
        """(row of B·H, batch, head, first index of the block) of this program: one launch axis, the blocks
        of one (batch, head) consecutive (see ``_grid``)."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(n, BLOCK)
        pid_bh = pid // n_blocks
        return pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), (pid % n_blocks) * BLOCK

    @triton.jit
    def _rows_of(X, at, rows, row_ok, stride, VEC: tl.constexpr, c0, c1, HEAD_D: tl.constexpr):
        """The two head-dim chunks of rows ``rows``. Without a tail (D1 = 0) ``c1`` is one column past the
        head dim: that tile reads nothing and, unused, is compiled away."""
        return (_tile(X, at, rows, row_ok, stride, VEC, c0, HEAD_D),
                _tile(X, at, rows, row_ok, stride, VEC, c1, HEAD_D))

    @triton.jit
    def _scores(a0, a1, b0, b1, D1: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """a·bᵀ over the head dim, split as [0, D0) + [D0, D0 + D1) (D1 = 0: one chunk)."""
        s = _dot(a0, tl.trans(b0), PREC, UPCAST)
        if D1 > 0:
            s += _dot(a1, tl.trans(b1), PREC, UPCAST)
        return s

    @triton.jit
    def _key_ok(KM, b, s_kmb, cols, n_ok, HAS_MASK: tl.constexpr):
        """Keys that take part: inside the sequence and, with a key mask, not masked out."""
        if HAS_MASK:
            keep = tl.load(KM + b * s_kmb + cols, mask=n_ok, other=0)
            return n_ok & (keep != 0)
        return n_ok

    @triton.jit
    def _fwd_kernel(Q, K, V, TQ, TK, TV, O, TO, L, KM,
                    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                    s_tqb, s_tqh, s_tqn, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
                    s_ob, s_oh, s_on, s_kmb,
                    H, N_Q, N_KV, scale, qk_scale,
                    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, VEC: tl.constexpr,
                    MODE: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program = one query block of one (batch, head); programs run query blocks fastest (see
        ``_grid``). L is the log-sum-exp of S in log2 units (the kernel works with exp2 and S·log2 e);
        +inf for a row without any key to attend, whose O and dO are 0. O / TO / L are contiguous."""
        pid_bh, b, h, first = _program(N_Q, BLOCK_M, H)
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        c1 = D0 + tl.arange(0, D1 if D1 > 0 else 1)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < N_Q
        io = Q.dtype.element_ty
        q_at = (b * s_qb + h * s_qh) * VEC
        k_at = (b * s_kb + h * s_kh) * VEC
        v_at = (b * s_vb + h * s_vh) * VEC

        q0, q1 = _rows_of(Q, q_at, rows, m_ok, s_qn, VEC, c0, c1, HEAD_D)
        l_ptrs = L + pid_bh.to(tl.int64) * N_Q + rows
        if MODE == 2:  # exact P from the saved log-sum-exp: no running max, no rescaling
            m_i = tl.load(l_ptrs, mask=m_ok, other=0.0)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
            acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 1], tl.float32)
        if MODE != 0:
            tq_at = (b * s_tqb + h * s_tqh) * VEC
            tk_at = (b * s_tkb + h * s_tkh) * VEC
            tv_at = (b * s_tvb + h * s_tvh) * VEC
            tq0, tq1 = _rows_of(TQ, tq_at, rows, m_ok, s_tqn, VEC, c0, c1, HEAD_D)
            acc_t0 = tl.zeros([BLOCK_M, D0], tl.float32)
            acc_t1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 1], tl.float32)
            mu = tl.zeros([BLOCK_M], tl.float32)
            ref = tl.zeros([BLOCK_M], tl.float32)

        for start_n in range(0, N_KV, BLOCK_N):
            cn = start_n + offs_n
            n_ok = cn < N_KV
            cols = cn.to(tl.int64)
            valid = _key_ok(KM, b, s_kmb, cols, n_ok, HAS_MASK)
            k0, k1 = _rows_of(K, k_at, cols, n_ok, s_kn, VEC, c0, c1, HEAD_D)
            v0, v1 = _rows_of(V, v_at, cols, n_ok, s_vn, VEC, c0, c1, HEAD_D)
            s = _scores(q0, q1, k0, k1, D1, PREC, UPCAST) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            if MODE == 2:
                p = tl.math.exp2(s - m_i[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no key yet: p = 0, not NaN
                alpha = tl.math.exp2(m_i - m_safe)
                p = tl.math.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc0 = acc0 * alpha[:, None] + _dot(p.to(io), v0, PREC, UPCAST)
                if D1 > 0:
                    acc1 = acc1 * alpha[:, None] + _dot(p.to(io), v1, PREC, UPCAST)
                m_i = m_new
            if MODE != 0:
                tk0, tk1 = _rows_of(TK, tk_at, cols, n_ok, s_tkn, VEC, c0, c1, HEAD_D)
                tv0, tv1 = _rows_of(TV, tv_at, cols, n_ok, s_tvn, VEC, c0, c1, HEAD_D)
                ds = (_scores(tq0, tq1, k0, k1, D1, PREC, UPCAST) + _scores(q0, q1, tk0, tk1, D1, PREC, UPCAST)) * scale
                # dO = Σ P·(dS − ref)·v + P·dv − (μ − ref)·O holds for any per-row ref, and only dS − μ
                # matters: a large common row offset in dS (e.g. q·dkᵀ ≈ const) cancels in the end. So the
                # product is formed in fp32 relative to ref, the P-weighted mean of dS over the first key
                # block, before it is rounded to the IO dtype for the tensor-core dot; rounding p·dS itself
                # would leave an error ∝ the offset after μ·O is subtracted (as the backward forms
                # p·(dp − delta) in fp32 before rounding). Masked keys: p = 0 and ds is finite.
                pds = p * ds
                if start_n == 0:
                    p_sum = tl.sum(p, 1)
                    ref = tl.sum(pds, 1) / tl.where(p_sum > 0, p_sum, 1.0)    # 0 for a row without keys
                pds = pds - p * ref[:, None]
                if MODE == 1:
                    mu = mu * alpha + tl.sum(pds, 1)
                    acc_t0 = acc_t0 * alpha[:, None]
                    if D1 > 0:
                        acc_t1 = acc_t1 * alpha[:, None]
                else:
                    mu = mu + tl.sum(pds, 1)
                acc_t0 += _dot(pds.to(io), v0, PREC, UPCAST) + _dot(p.to(io), tv0, PREC, UPCAST)
                if D1 > 0:
                    acc_t1 += _dot(pds.to(io), v1, PREC, UPCAST) + _dot(p.to(io), tv1, PREC, UPCAST)

        o_at = (b * s_ob + h * s_oh) * VEC
        if MODE == 2:
            o0 = _tile(O, o_at, rows, m_ok, s_on, VEC, c0, HEAD_D).to(tl.float32)
            _put(TO, o_at, rows, m_ok, s_on, VEC, c0, HEAD_D, (acc_t0 - mu[:, None] * o0).to(io))   # mu = μ − ref
            if D1 > 0:
                o1 = _tile(O, o_at, rows, m_ok, s_on, VEC, c1, HEAD_D).to(tl.float32)
                _put(TO, o_at, rows, m_ok, s_on, VEC, c1, HEAD_D, (acc_t1 - mu[:, None] * o1).to(io))
        else:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            inv = tl.where(l_i > 0, 1.0 / l_safe, 0.0)                 # a row without keys: O = 0
            o0 = acc0 * inv[:, None]
            _put(O, o_at, rows, m_ok, s_on, VEC, c0, HEAD_D, o0.to(io))
            if D1 > 0:
                o1 = acc1 * inv[:, None]
                _put(O, o_at, rows, m_ok, s_on, VEC, c1, HEAD_D, o1.to(io))
            tl.store(l_ptrs, tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("inf")), mask=m_ok)
            if MODE == 1:
                _put(TO, o_at, rows, m_ok, s_on, VEC, c0, HEAD_D, ((acc_t0 - mu[:, None] * o0) * inv[:, None]).to(io))
                if D1 > 0:
                    _put(TO, o_at, rows, m_ok, s_on, VEC, c1, HEAD_D,
                         ((acc_t1 - mu[:, None] * o1) * inv[:, None]).to(io))

    @triton.jit
    def _delta_kernel(O, DO, D, s_ob, s_oh, s_on, s_gb, s_gh, s_gn, H, N_Q,
                      HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, VEC: tl.constexpr,
                      BLOCK_M: tl.constexpr):
        """D_i = rowsum(dO ⊙ O) in fp32, [B·H, N_q], without fp32 copies of O and dO."""
        pid_bh, b, h, first = _program(N_Q, BLOCK_M, H)
        offs_m = first + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < N_Q
        c0 = tl.arange(0, D0)
        o_at = (b * s_ob + h * s_oh) * VEC
        g_at = (b * s_gb + h * s_gh) * VEC
        o = _tile(O, o_at, rows, m_ok, s_on, VEC, c0, HEAD_D).to(tl.float32)
        g = _tile(DO, g_at, rows, m_ok, s_gn, VEC, c0, HEAD_D).to(tl.float32)
        delta = tl.sum(o * g, 1)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            o = _tile(O, o_at, rows, m_ok, s_on, VEC, c1, HEAD_D).to(tl.float32)
            g = _tile(DO, g_at, rows, m_ok, s_gn, VEC, c1, HEAD_D).to(tl.float32)
            delta += tl.sum(o * g, 1)
        tl.store(D + pid_bh.to(tl.int64) * N_Q + rows, delta, mask=m_ok)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, L, D, DK, DV, KM,
                         s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                         s_gb, s_gh, s_gn, s_kmb,
                         H, N_Q, N_KV, scale, qk_scale,
                         HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, VEC: tl.constexpr,
                         NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, HAS_MASK: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program = one key block: if NEED_DV, dV = Σ_i Pᵀ·dO; if NEED_DK, dK = scale·Σ_i dSᵀ·q with
        dS = P ⊙ (dO·vᵀ − D), D_i = rowsum(dO ⊙ O) (``_delta_kernel``), P recomputed from the saved log2
        log-sum-exp L. DK and DV are contiguous [B, H, N_kv, d]."""
        pid_bh, b, h, first = _program(N_KV, BLOCK_N, H)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = first + tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        c1 = D0 + tl.arange(0, D1 if D1 > 0 else 1)
        cols = offs_n.to(tl.int64)
        n_ok = offs_n < N_KV
        valid = _key_ok(KM, b, s_kmb, cols, n_ok, HAS_MASK)
        io = Q.dtype.element_ty
        q_at = (b * s_qb + h * s_qh) * VEC
        k_at = (b * s_kb + h * s_kh) * VEC
        v_at = (b * s_vb + h * s_vh) * VEC
        do_at = (b * s_dob + h * s_doh) * VEC

        k0, k1 = _rows_of(K, k_at, cols, n_ok, s_kn, VEC, c0, c1, HEAD_D)
        v0, v1 = _rows_of(V, v_at, cols, n_ok, s_vn, VEC, c0, c1, HEAD_D)
        dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 1], tl.float32)
        dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 1], tl.float32)
        row0 = pid_bh.to(tl.int64) * N_Q
        for start_m in range(0, N_Q, BLOCK_M):
            rm = start_m + offs_m
            m_ok = rm < N_Q
            rows = rm.to(tl.int64)
            q0, q1 = _rows_of(Q, q_at, rows, m_ok, s_qn, VEC, c0, c1, HEAD_D)
            do0, do1 = _rows_of(DO, do_at, rows, m_ok, s_don, VEC, c0, c1, HEAD_D)
            lse = tl.load(L + row0 + rows, mask=m_ok, other=float("inf"))
            s = _scores(q0, q1, k0, k1, D1, PREC, UPCAST) * qk_scale
            p = tl.where(m_ok[:, None] & valid[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            if NEED_DV:
                pt = tl.trans(p.to(io))
                dv0 += _dot(pt, do0, PREC, UPCAST)
                if D1 > 0:
                    dv1 += _dot(pt, do1, PREC, UPCAST)
            if NEED_DK:
                delta = tl.load(D + row0 + rows, mask=m_ok, other=0.0)
                dp = _scores(do0, do1, v0, v1, D1, PREC, UPCAST)
                dst = tl.trans((p * (dp - delta[:, None])).to(io))
                dk0 += _dot(dst, q0, PREC, UPCAST)
                if D1 > 0:
                    dk1 += _dot(dst, q1, PREC, UPCAST)
        g_at = (b * s_gb + h * s_gh) * VEC
        if NEED_DV:
            _put(DV, g_at, cols, n_ok, s_gn, VEC, c0, HEAD_D, dv0.to(io))
            if D1 > 0:
                _put(DV, g_at, cols, n_ok, s_gn, VEC, c1, HEAD_D, dv1.to(io))
        if NEED_DK:
            _put(DK, g_at, cols, n_ok, s_gn, VEC, c0, HEAD_D, (dk0 * scale).to(io))
            if D1 > 0:
                _put(DK, g_at, cols, n_ok, s_gn, VEC, c1, HEAD_D, (dk1 * scale).to(io))

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, L, D, DQ, KM,
                       s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                       s_gb, s_gh, s_gn, s_kmb,
                       H, N_Q, N_KV, scale, qk_scale,
                       HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, VEC: tl.constexpr,
                       HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program = one query block: dQ = scale·Σ_j dS·k (a separate pass, so no atomics)."""
        pid_bh, b, h, first = _program(N_Q, BLOCK_M, H)
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        c1 = D0 + tl.arange(0, D1 if D1 > 0 else 1)
        rows = offs_m.to(tl.int64)
        m_ok = offs_m < N_Q
        io = Q.dtype.element_ty
        q_at = (b * s_qb + h * s_qh) * VEC
        k_at = (b * s_kb + h * s_kh) * VEC
        v_at = (b * s_vb + h * s_vh) * VEC
        do_at = (b * s_dob + h * s_doh) * VEC

        q0, q1 = _rows_of(Q, q_at, rows, m_ok, s_qn, VEC, c0, c1, HEAD_D)
        do0, do1 = _rows_of(DO, do_at, rows, m_ok, s_don, VEC, c0, c1, HEAD_D)
        row0 = pid_bh.to(tl.int64) * N_Q
        lse = tl.load(L + row0 + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(D + row0 + rows, mask=m_ok, other=0.0)
        dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
        dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 1], tl.float32)
        for start_n in range(0, N_KV, BLOCK_N):
            cn = start_n + offs_n
            n_ok = cn < N_KV
            cols = cn.to(tl.int64)
            valid = _key_ok(KM, b, s_kmb, cols, n_ok, HAS_MASK)
            k0, k1 = _rows_of(K, k_at, cols, n_ok, s_kn, VEC, c0, c1, HEAD_D)
            v0, v1 = _rows_of(V, v_at, cols, n_ok, s_vn, VEC, c0, c1, HEAD_D)
            s = _scores(q0, q1, k0, k1, D1, PREC, UPCAST) * qk_scale
            p = tl.where(valid[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _scores(do0, do1, v0, v1, D1, PREC, UPCAST)
            ds = (p * (dp - delta[:, None])).to(io)
            dq0 += _dot(ds, k0, PREC, UPCAST)
            if D1 > 0:
                dq1 += _dot(ds, k1, PREC, UPCAST)
        g_at = (b * s_gb + h * s_gh) * VEC
        _put(DQ, g_at, rows, m_ok, s_gn, VEC, c0, HEAD_D, (dq0 * scale).to(io))
        if D1 > 0:
            _put(DQ, g_at, rows, m_ok, s_gn, VEC, c1, HEAD_D, (dq1 * scale).to(io))

    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
else:
    INTERPRETED = False


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------
def _config(kind: str, head_dim: int, dtype: torch.dtype = torch.float16, n: int = 1024, arch: int = 90) -> dict:
    """Block sizes, warps and stages per kernel (``fwd``: MODE 0, ``fwd_t``: MODE 1, ``tangent``: MODE 2,
    ``delta``, ``dkdv``, ``dq``), keyed on the padded head dim, the IO dtype, the sequence length and the
    GPU generation (``arch``: 80 for A100, 90 for H100/H200; newer GPUs take the sm_90 rows).

    Not autotuned (no GPU on the development machines): starting points from the usual flash-attention
    choices, each compiled for sm_90 with Triton's bundled ptxas by ``make compile-check``
    (benchmarks/results/kernels/compile.md), which fails on a 16-bit kernel that spills registers. 16-bit
    IO: the primal forward keeps one [BLOCK_M, d] accumulator and affords 128-row blocks (64 for n ≤ 256,
    so that a (batch, head) still spreads over several programs); the tangent passes add a tangent
    accumulator and three tangent tiles, so they take 64 rows and 8 warps; a padded head dim above 64
    halves the key block; sm_80 takes one pipeline stage fewer (164 KB of shared memory, not 227 KB) and,
    with mma.sync instead of wgmma, narrower key blocks in the tangent and dk/dv passes (a one-off sweep
    compiled for sm_80: no 16-bit spills at d = 64, 72, 128; the compile check builds sm_90 only).
    float32 IO (``tf32x3`` dots, see ``_dot_flags``) splits each operand in two, which triples the live
    registers of a tile: its configs come from a sweep of tile shapes on sm_90, together with one
    power-of-two head-dim chunk, MODE 0 + MODE 2 for ``attention_jvp`` and dk, dv as two passes above a
    padded head dim of 64 — no fp32 kernel spills on sm_90 at d = 64, 72, 128 (compile.md). On sm_80 fp32
    takes 16 × 16 tiles, and its tangent pass still spills 392 B per thread at d = 72 and 128 (fp32 is the
    accuracy path: use bf16/fp16 for speed). ``make gpu-check`` times them on a GPU. Under the
    interpreter a single small config is used, with BLOCK_M ≠ BLOCK_N so that index mix-ups between the
    query and key axes cannot cancel out in tests.
    """
    if INTERPRETED:
        m, n_ = {"fwd": (32, 16), "fwd_t": (32, 16), "tangent": (32, 16), "dkdv": (16, 32), "dq": (32, 16),
                 "delta": (32, 16)}[kind]
        return dict(BLOCK_M=m, BLOCK_N=n_, num_warps=4, num_stages=1)
    if kind == "delta":
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)
    width = sum(_head_split(head_dim, dtype))
    big = width > 64
    if dtype == torch.float32:
        if arch < 90:
            return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        col = 0 if width <= 64 else (1 if width <= 96 else 2)      # d ≤ 64 | ≤ 96 (72, 80, 88) | ≤ 128
        m, n_, warps = {
            "fwd": [(64, 16, 4), (64, 16, 4), (64, 32, 8)],
            "fwd_t": [(16, 16, 4), (64, 16, 8), (64, 16, 8)],
            "tangent": [(16, 16, 4), (64, 16, 8), (64, 32, 8)],
            "dkdv": [(16, 32, 4), (16, 16, 4), (16, 16, 4)],
            "dq": [(64, 16, 4), (64, 16, 4), (16, 32, 4)],
        }[kind][col]
        return dict(BLOCK_M=m, BLOCK_N=n_, num_warps=warps, num_stages=1)
    if arch >= 90:
        tangent = dict(BLOCK_M=64, BLOCK_N=32 if big else 64, num_warps=8, num_stages=2)
        fwd_t, dkdv = tangent, dict(BLOCK_M=32 if big else 64, BLOCK_N=64, num_warps=8 if big else 4, num_stages=2)
    else:   # mma.sync keeps more of a tile in registers than wgmma: narrower key blocks
        tangent = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        fwd_t = dict(BLOCK_M=32 if big else 64, BLOCK_N=32, num_warps=8, num_stages=2)
        dkdv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2) if big else \
            dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return {
        "fwd": dict(BLOCK_M=128 if n > 256 else 64, BLOCK_N=64, num_warps=8 if big else 4,
                    num_stages=3 if arch >= 90 else 2),
        "fwd_t": fwd_t,
        "tangent": tangent,
        "dkdv": dkdv,
        "dq": dict(BLOCK_M=64, BLOCK_N=32 if big else 64, num_warps=8 if big else 4, num_stages=2),
    }[kind]


MAX_GRID = 2**31 - 1   # CUDA's limit on grid axis 0


def _grid(blocks: int, batch_heads: int) -> tuple[int]:
    """Launch grid of every kernel here: one axis, blocks of one (batch, head) consecutive. Programs that
    run together then share their head's K and V in L2 (with B·H on an axis of its own, the query blocks of
    one head were a whole B·H sweep apart, and once B·H·N·d outgrows L2 each block re-read K, V from HBM),
    and axis 0 allows 2^31 − 1 programs where axes 1 and 2 stop at 65535."""
    if blocks * batch_heads > MAX_GRID:
        raise ValueError(f"jvp_attention (triton): {batch_heads} (batch, head) pairs × {blocks} blocks exceed "
                         f"CUDA's grid limit of 2^31 − 1 programs; split the batch")
    return (blocks * batch_heads,)


# Per thread: a list that launches are appended to instead of run (``compile_specs``), else None.
_recording = threading.local()


def _launch(kernel, grid, *args, **kwargs):
    """Every kernel launch of this module, so that ``compile_specs`` sees exactly what the launchers pass."""
    record = getattr(_recording, "launches", None)
    if record is not None:
        record.append((kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def compile_specs(head_dims=(64, 72, 128), dtypes=(torch.float16, torch.bfloat16, torch.float32), n: int = 1024,
                  batch_heads: tuple[int, int] = (4, 16), arch: int = 90) -> list:
    """Every launch the autograd forward, jvp and backward (and ``attention_jvp``) make for [B, H, n, d]
    inputs, as ``kernels.compiling.CompileSpec`` for the sm_90 compile check: the launchers run on meta
    tensors with ``_launch`` recording, so arguments, configs and specialisation are the launchers' own."""
    from kernels.compiling import CompileSpec, launch_specialization, arg_names

    if triton is None or INTERPRETED:
        raise RuntimeError("compile_specs needs the compiled kernels: triton installed, TRITON_INTERPRET unset")
    specs = []
    B, H = batch_heads
    for d in head_dims:
        for dtype in dtypes:
            q, k, v = (torch.empty(B, H, n, d, dtype=dtype, device="meta") for _ in range(3))
            o, lse = torch.empty_like(q), torch.empty(B, H, n, device="meta")
            _recording.launches = launches = []
            try:
                with _config_arch(arch):
                    _fwd(q, k, v, d ** -0.5, 0)                                  # autograd forward
                    _fwd(q, k, v, d ** -0.5, 2, tangents=(q, k, v), o=o, lse=lse)  # its jvp
                    _bwd(q, k, v, o, lse, o, d ** -0.5)                          # its backward
                    _jvp_passes(q, k, v, (q, k, v), d ** -0.5)                   # attention_jvp
            finally:
                _recording.launches = None
            seen = {s.name for s in specs}
            for kernel, args, kwargs in launches:
                kwargs = dict(kwargs)
                warps, stages = kwargs.pop("num_warps"), kwargs.pop("num_stages")
                named = dict(zip(arg_names(kernel), args)) | kwargs
                signature, constexprs, attrs = launch_specialization(kernel, named)
                what = kernel.fn.__name__.strip("_").removesuffix("_kernel")
                if "MODE" in kwargs:
                    what += f" MODE {kwargs['MODE']}"
                if "NEED_DK" in kwargs and not (kwargs["NEED_DK"] and kwargs["NEED_DV"]):
                    what += " dk" if kwargs["NEED_DK"] else " dv"
                name = f"attention {what} d={d} {str(dtype).removeprefix('torch.')} N={n}"
                if name not in seen:
                    seen.add(name)
                    specs.append(CompileSpec(name, kernel, signature, constexprs, warps, stages, dtype, attrs))
    return specs


_arch_override = threading.local()


@contextlib.contextmanager
def _config_arch(arch: int):
    """Launch configs for ``arch`` whatever the tensors' device (compile_specs works on meta tensors)."""
    _arch_override.value = arch
    try:
        yield
    finally:
        _arch_override.value = None


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make t's device current for the launch (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _head_split(head_dim: int, dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """(D0, D1): the head dim as a power-of-two chunk plus a power-of-two tail chunk (0: none), each ≥ 16
    (the MMA's granularity), when that pads less than one power of two would: 72 → 64 + 16 (80 columns of
    MMA work, not 128), 40 → 32 + 16, 88 → 64 + 32; 64 → 64 + 0; 56 → 64 + 0 (32 + 32 gains nothing).
    float32 IO keeps one power-of-two chunk: the tail's extra tf32x3 dots made its tangent and dk passes
    spill registers at d = 72 (compiled for sm_90), and fp32 is the accuracy path, not the fast one."""
    full = max(16, 1 << (head_dim - 1).bit_length())
    d0 = 1 << (head_dim.bit_length() - 1)
    if head_dim <= 16 or d0 == head_dim or dtype == torch.float32:
        return full, 0
    d1 = max(16, 1 << (head_dim - d0 - 1).bit_length())
    return (d0, d1) if d0 + d1 < full else (full, 0)


def _vec(*tensors: torch.Tensor) -> int:
    """How many elements make 16 bytes, if every tensor's base is 16-byte aligned and its batch, head and
    row strides are multiples of that (the kernels then index rows as stride/VEC · VEC with VEC constexpr,
    and the compiler emits 16-byte vector loads and cp.async copies); else 1."""
    vec = 16 // tensors[0].element_size()
    ok = all(t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in t.stride()[:3]) for t in tensors)
    return vec if ok else 1


def _strides3(t: torch.Tensor, vec: int) -> tuple[int, int, int]:
    return t.stride(0) // vec, t.stride(1) // vec, t.stride(2) // vec


def _arch(t: torch.Tensor) -> int:
    """The compute capability the launch configs are for: the tensor's GPU (90 off GPU)."""
    override = getattr(_arch_override, "value", None)
    if override is not None:
        return override
    if not t.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


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


def _head_flags(d: int, vec: int, dtype: torch.dtype) -> dict:
    d0, d1 = _head_split(d, dtype)
    return dict(HEAD_D=d, D0=d0, D1=d1, VEC=vec)


def _mask_args(key_mask: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """(pointer, batch stride, HAS_MASK) for the kernels: a [B, N_kv] uint8 mask, or an unused pointer."""
    if key_mask is None:
        return like, 0, False
    return key_mask, key_mask.stride(0), True


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


def key_mask_matrix(key_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A key-padding mask as the kernels take it: [B, N_kv] uint8 (1 = the key takes part), from a bool
    [B, N_kv] tensor or one that broadcasts as SDPA's ``attn_mask`` ([B or 1, 1, 1, N_kv])."""
    if key_mask is None:
        return None
    B, n_kv = q.shape[0], k.shape[2]
    if key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be a bool tensor (True = the key takes part), got {key_mask.dtype}")
    m = key_mask
    if m.dim() == 4 and m.shape[1] == m.shape[2] == 1:
        m = m[:, 0, 0]
    if m.dim() != 2 or m.shape[1] != n_kv or m.shape[0] not in (1, B):
        raise ValueError(f"key_mask of shape {tuple(key_mask.shape)}: expected [B, N_kv] = [{B}, {n_kv}] or "
                         f"[B, 1, 1, N_kv]")
    if m.device != q.device:
        raise ValueError(f"key_mask is on {m.device}, q on {q.device}")
    return m.expand(B, n_kv).to(torch.uint8).contiguous()


def check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise RuntimeError if triton cannot run here, ValueError for inputs the kernels cannot take."""
    reason = triton_unavailable(q.device)
    if reason is not None:
        raise RuntimeError(f"jvp_attention (triton): {reason}")
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"jvp_attention (triton): {reason}")


def _fwd(q, k, v, scale, mode, tangents=None, o=None, lse=None, key_mask=None):
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
    vec = _vec(q, k, v, tq, tk, tv, o, do)
    cfg = _config(("fwd", "fwd_t", "tangent")[mode], d, q.dtype, max(n_q, n_kv), _arch(q))
    grid = _grid(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)
    km, s_kmb, has_mask = _mask_args(key_mask, q)
    with _on_device(q):
        _launch(_fwd_kernel, grid, q, k, v, tq, tk, tv, o, do, lse, km,
                *_strides3(q, vec), *_strides3(k, vec), *_strides3(v, vec),
                *_strides3(tq, vec), *_strides3(tk, vec), *_strides3(tv, vec), *_strides3(o, vec),
                s_kmb, H, n_q, n_kv, scale, scale * _LOG2E,
                MODE=mode, HAS_MASK=has_mask, **_head_flags(d, vec, q.dtype), **_dot_flags(q.dtype), **cfg)
    return (None if mode == 2 else o), (None if mode == 2 else lse), (None if mode == 0 else do)


def _bwd(q, k, v, o, lse, grad_o, scale, needs=(True, True, True), key_mask=None):
    """dq, dk, dv (None for those ``needs`` leaves out): ``_delta_kernel``, then the key-block pass if dk
    or dv is needed (dv alone skips dO·vᵀ; fp32 above a padded head dim of 64 runs dk and dv as two
    passes, whose state fits in registers where one pass's spills), then the query-block pass if dq is."""
    B, H, n_q, d = q.shape
    n_kv = k.shape[2]
    q, k, v, grad_o = map(_unit_last, (q, k, v, grad_o))
    need_dq, need_dk, need_dv = needs
    dq = torch.empty((B, H, n_q, d), device=q.device, dtype=q.dtype) if need_dq else None
    dk = torch.empty((B, H, n_kv, d), device=q.device, dtype=q.dtype) if need_dk else None
    dv = torch.empty((B, H, n_kv, d), device=q.device, dtype=q.dtype) if need_dv else None
    vec = _vec(q, k, v, grad_o, o, *(t for t in (dq, dk, dv) if t is not None))
    heads = _head_flags(d, vec, q.dtype)
    delta = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)   # D_i = rowsum(dO ⊙ O)
    km, s_kmb, has_mask = _mask_args(key_mask, q)
    common = (*_strides3(q, vec), *_strides3(k, vec), *_strides3(v, vec), *_strides3(grad_o, vec))
    tail = (H, n_q, n_kv, scale, scale * _LOG2E)
    arch, n = _arch(q), max(n_q, n_kv)
    with _on_device(q):
        cfg = _config("delta", d, q.dtype, n, arch)
        _launch(_delta_kernel, _grid(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H),
            o, grad_o, delta, *_strides3(o, vec), *_strides3(grad_o, vec), H, n_q, **heads,
            BLOCK_M=cfg["BLOCK_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        split = q.dtype == torch.float32 and sum(_head_split(d, q.dtype)) > 64
        passes = [(need_dk, False), (False, need_dv)] if split else [(need_dk, need_dv)]
        for pass_dk, pass_dv in passes:
            if not (pass_dk or pass_dv):
                continue
            out = dk if pass_dk else dv
            cfg = _config("dkdv", d, q.dtype, n, arch)
            _launch(_bwd_dkdv_kernel, _grid(triton.cdiv(n_kv, cfg["BLOCK_N"]), B * H),
                q, k, v, grad_o, lse, delta, dk if pass_dk else out, dv if pass_dv else out, km, *common,
                *_strides3(out, vec), s_kmb, *tail, NEED_DK=pass_dk, NEED_DV=pass_dv, HAS_MASK=has_mask, **heads,
                **_dot_flags(q.dtype), **cfg)
        if dq is not None:
            cfg = _config("dq", d, q.dtype, n, arch)
            _launch(_bwd_dq_kernel, _grid(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H),
                q, k, v, grad_o, lse, delta, dq, km, *common, *_strides3(dq, vec), s_kmb, *tail,
                HAS_MASK=has_mask, **heads, **_dot_flags(q.dtype), **cfg)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class _AttentionTangent(torch.autograd.Function):
    """dO from the saved O and log-sum-exp (kernel MODE 2). An autograd.Function of its own so that a
    backward through the tangent (which would need second-order terms) fails loudly instead of
    returning a partial gradient."""

    @staticmethod
    def forward(q, k, v, o, lse, tq, tk, tv, scale, key_mask):
        return _fwd(q, k, v, scale, 2, tangents=(tq, tk, tv), o=o, lse=lse, key_mask=key_mask)[2]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("jvp_attention (triton): backpropagating through the attention tangent is not "
                           "supported; detach the tangent (MeanFlow / sCM use it only inside a stop-gradient "
                           "target) or use attention=torch")


class JVPAttentionFunction(torch.autograd.Function):
    """(q, k, v, scale, key_mask) -> (O, log2-sum-exp); use ``jvp_attention`` rather than calling this.

    ``forward`` / ``setup_context`` are separate because functorch transforms (``torch.func.jvp``)
    require it. The log-sum-exp is an output (marked non-differentiable) because with ``setup_context``
    only inputs and outputs can be saved. ``key_mask`` is the kernels' [B, N_kv] uint8 matrix or None.
    """

    @staticmethod
    def forward(q, k, v, scale, key_mask):
        o, lse, _ = _fwd(q, k, v, scale, 0, key_mask=key_mask)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, key_mask = inputs
        o, lse = output
        ctx.scale, ctx.key_mask = scale, key_mask
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _scale, _key_mask):
        q, k, v, o, lse = ctx.saved_tensors
        return _AttentionTangent.apply(q, k, v, o, lse, tq, tk, tv, ctx.scale, ctx.key_mask), None

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, o, lse, grad_o, ctx.scale, ctx.needs_input_grad[:3], ctx.key_mask)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        key_mask: torch.Tensor | None = None):
    """Math attention in plain torch ops (the ``torch`` implementation): supports jvp, backward and vmap
    natively, and materialises the [N, N] matrices (and, under jvp, their tangents). ``key_mask``: bool
    [B, N_kv] (True = the key takes part); a row without any key gets 0, as in the kernels."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if key_mask is None:
        return torch.softmax(s, dim=-1) @ v
    keep = key_mask_matrix(key_mask, q, k).bool()[:, None, None, :]
    p = torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), dim=-1) * keep
    return p @ v


def attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The implementation ``jvp_attention`` runs for these inputs: the forced one, or under ``auto``
    triton for CUDA tensors the kernels support and torch otherwise (e.g. head dim > 128, float64)."""
    impl = dispatch.policy("attention")
    if impl == dispatch.AUTO:
        ok = q.is_cuda and triton_unavailable(q.device) is None and unsupported_reason(q, k, v) is None
        return "triton" if ok else "torch"
    return impl


def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v for [B, heads, N, d] tensors (scale defaults to 1/√d), differentiable in
    both modes: ``torch.func.jvp`` / ``torch.autograd.forward_ad`` and ``backward``. ``key_mask``: bool
    [B, N_kv] or [B, 1, 1, N_kv] (True = the key takes part, SDPA's convention), for padded sequences;
    a query row with no key to attend gives 0 (SDPA gives NaN there).

    The implementation follows ``kernels.dispatch`` (op ``attention``) and is recorded there. Forcing
    ``triton`` on CPU tensors needs TRITON_INTERPRET=1 (slow; meant for tests) and raises otherwise.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if attention_impl(q, k, v) == "torch":
        dispatch.record("attention", "torch")
        return attention_reference(q, k, v, scale, key_mask)
    check_triton_inputs(q, k, v)
    dispatch.record("attention", "triton")
    return JVPAttentionFunction.apply(q, k, v, scale, key_mask_matrix(key_mask, q, k))[0]


def attention_jvp(q, k, v, tq, tk, tv, scale: float | None = None,
                  key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, dO) for explicit tangents in one fused online-softmax pass (kernel MODE 1), without autograd:
    for code that propagates tangents itself. Triton only; inputs are not differentiated through."""
    check_triton_inputs(q, k, v)
    check_triton_inputs(tq, tk, tv)
    if (tq.shape, tk.shape, tv.shape) != (q.shape, k.shape, v.shape) or tq.dtype != q.dtype:
        raise ValueError("tangents must have the shapes and dtype of q, k, v")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        return _jvp_passes(q, k, v, (tq, tk, tv), scale, key_mask_matrix(key_mask, q, k))


def _jvp_passes(q, k, v, tangents, scale, key_mask=None):
    """(O, dO): one fused MODE-1 pass, except for fp32 IO at a padded head dim above 64, where MODE 1's
    state does not fit in registers (see ``_config``) and MODE 0 then MODE 2 (the autograd path) do not spill."""
    if q.dtype == torch.float32 and sum(_head_split(q.shape[-1], q.dtype)) > 64:
        o, lse, _ = _fwd(q, k, v, scale, 0, key_mask=key_mask)
        return o, _fwd(q, k, v, scale, 2, tangents=tangents, o=o, lse=lse, key_mask=key_mask)[2]
    o, _, do = _fwd(q, k, v, scale, 1, tangents=tangents, key_mask=key_mask)
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
    key_padding = attn_mask is not None and _is_key_padding(attn_mask, query, key)
    routed = (forward_ad or stack[-1]) and (attn_mask is None or key_padding) and dropout_p == 0.0 \
        and not is_causal and not enable_gqa
    if routed and attention_impl(query, key, value) == "triton":
        routed = unsupported_reason(query, key, value) is None
    if routed:
        return jvp_attention(query, key, value, scale, attn_mask if key_padding else None)
    dispatch.record("attention", "torch")
    if forward_ad:
        return math_sdpa(query, key, value, **args)
    return original(query, key, value, **args)


def _is_key_padding(attn_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> bool:
    """A bool ``attn_mask`` that only masks keys ([B or 1, 1, 1, N_kv]): the kernels take it."""
    m = attn_mask
    return (m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == m.shape[2] == 1
            and m.shape[3] == key.shape[-2] and m.shape[0] in (1, query.shape[0]))


def enter_patched_forward(route_plain_calls: bool) -> None:
    if not hasattr(_patched, "stack"):
        _patched.stack = []
    _patched.stack.append(route_plain_calls)


def exit_patched_forward() -> None:
    _patched.stack.pop()


__all__ = ["JVPAttention", "JVPAttentionFunction", "attention_impl", "attention_jvp", "attention_reference",
           "check_triton_inputs", "forward_ad_active", "jvp_attention", "key_mask_matrix", "math_sdpa", "routed_sdpa",
           "scaled_dot_product_attention", "triton_unavailable", "unsupported_reason", "MAX_HEAD_DIM"]
