"""The kernels as Triton/nvcc compiled them for the GPU (not the interpreter), at the shapes training uses.

`make gpu-check` (benchmarks/gpu_check.py) runs this file with TRITON_INTERPRET=0. Every test is marked
``gpu``: `make test` deselects them, and any other run skips them with the reason where there is no CUDA
device or where the kernels were defined under TRITON_INTERPRET=1 (tests/conftest.py sets it for the CPU
suite). Shapes: head dims 64/72/128, N 256–4096 and odd N (257, 1000, N_q ≠ N_kv), bf16/fp16/fp32, views of a
qkv projection, a key-padding mask, and one tensor of more than 2^31 elements per kernel.

Accuracy (benchmarks.gpu_check.check_error, on the max and the RMS error): error against the float64 truth
of the same rounded inputs ≤ 2 × the error of PyTorch's own op in that dtype + one ulp of the truth. PyTorch's
own op: the eager formula for the DPM step; SDPA flash (16-bit) or memory-efficient (fp32) for the attention
forward and backward; for the tangent, which fused SDPA cannot give, the larger of math attention under
torch.func.jvp in that dtype and SDPA's forward error carried to the tangent's size — PyTorch's fused fp32
attention multiplies on tensor cores with 3×TF32 (cutlass OpMultiplyAddFastF32), as the kernels' tf32x3
dots do, while its IEEE fp32 math path is more exact than any tensor-core path (≈10× at N = 4096 in an
emulation with truncating fp32 accumulation); the reference formula in that dtype for the feature distance.
Each check's error/bound is recorded (``record_property``) for gpu_check's report.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels.attention as ja
import kernels.dpm_solver_step as kds
from benchmarks.gpu_check import DTYPE_NAMES, ErrorStats, check_error
from benchmarks.kernel_dpm_solver_step import COEFFS
from kernels import dispatch, perceptual
from kernels.attention import attention_jvp, attention_reference, jvp_attention
from kernels.dpm_solver_step import dpm_solver_pp_step, dpm_solver_step_torch


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False): `make gpu-check` runs these on a GPU"
    if ja.INTERPRETED or kds.interpreted():
        return ("the kernels were defined under TRITON_INTERPRET=1 (tests/conftest.py sets it for the CPU suite): "
                "these test the compiled kernels; `make gpu-check` runs them with TRITON_INTERPRET=0")
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]
CUDA = "cuda"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
ALL = (BF16, FP16, FP32)


@pytest.fixture(autouse=True)
def _seeded_and_released():
    """Seeded inputs; the caching allocator emptied after each test (the 2^31 cases take 30–50 GB)."""
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Checks:
    """check_error over one test's named outputs: each error/bound recorded for the report, every violation
    reported together at the end (so one failing output does not hide the others)."""

    def __init__(self, record_property, dtype, floor_ulps=1.0):
        self.record, self.dtype, self.floor_ulps = record_property, dtype, floor_ulps
        self.failures = []

    def __call__(self, name, kernel: ErrorStats, torch_own):
        use, failure = check_error(kernel, torch_own, self.dtype, self.floor_ulps)
        self.record(name, f"{use:.4f}")
        if failure:
            self.failures.append(f"{name}: {failure}")

    def verify(self):
        assert not self.failures, "\n".join(self.failures)


def _id(*parts):
    return "-".join(DTYPE_NAMES.get(p, str(p)) for p in parts)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, key_mask=None):
    """PyTorch's fused attention in q's dtype: flash for 16-bit, memory-efficient for fp32 or a key mask."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _backward(fn, q, k, v, cot):
    """(dq, dk, dv) of fn at q, k, v for the cotangent, on leaves that keep the inputs' layout."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    fn(*leaves).backward(cot)
    return [x.grad for x in leaves]


def _kernel_outputs(q, k, v, tq, tk, tv, cot, key_mask=None, pick=lambda t: t):
    """Every kernel output (picked right away, so the 2^31 case never holds them all)."""
    def kernel(q, k, v):
        return jvp_attention(q, k, v, key_mask=key_mask)

    out = {}
    with dispatch.forced("attention", "triton"):
        o, do = torch.func.jvp(kernel, (q, k, v), (tq, tk, tv))
        out.update({"forward": pick(o), "tangent": pick(do)})
        del o, do
        o, do = attention_jvp(q, k, v, tq, tk, tv, key_mask=key_mask)
        out.update({"fused forward": pick(o), "fused tangent": pick(do)})
        del o, do
        grads = _backward(kernel, q, k, v, cot)
    assert dispatch.last_implementation("attention") == "triton"
    out.update({f"grad {name}": pick(g) for name, g in zip("qkv", grads, strict=True)})
    return out


def _torch_outputs(q, k, v, tq, tk, tv, cot, key_mask=None):
    """PyTorch's own: fused SDPA forward and backward, math attention under torch.func.jvp for the tangent."""
    def fused(q, k, v):
        return _sdpa(q, k, v, key_mask)

    def math(q, k, v):
        return attention_reference(q, k, v, key_mask=key_mask)

    _, tangent = torch.func.jvp(math, (q, k, v), (tq, tk, tv))
    grads = _backward(fused, q, k, v, cot)
    return {"forward": fused(q, k, v), "tangent": tangent,
            **{f"grad {n}": g for n, g in zip("qkv", grads, strict=True)}}


def _truth(q, k, v, tq, tk, tv, cot, key_mask=None):
    def math(q, k, v):
        return attention_reference(q, k, v, key_mask=key_mask)

    hi = [x.double() for x in (q, k, v, tq, tk, tv, cot)]
    o, do = torch.func.jvp(math, tuple(hi[:3]), tuple(hi[3:6]))
    grads = _backward(math, *hi[:3], hi[6])
    return {"forward": o, "tangent": do, **{f"grad {n}": g for n, g in zip("qkv", grads, strict=True)}}


def _check_attention(checks, mine, theirs, truth):
    own = {name: ErrorStats.of(value, truth[name]) for name, value in theirs.items()}
    own["tangent"] = [own["tangent"], own["forward"].carried_to(own["tangent"])]
    for name, value in mine.items():
        key = name.removeprefix("fused ")
        checks(name, ErrorStats.of(value, truth[key]), own[key])
    checks.verify()


ATTENTION = [  # (dtype, head dim, N_q, N_kv); 16-bit N ≤ 256 takes its own primal block size (_config)
    *((dt, d, 1024, 1024) for dt in ALL for d in (64, 72, 128)),
    *((dt, d, 256, 256) for dt in (BF16, FP16) for d in (64, 72, 128)),
    (BF16, 64, 4096, 4096), (FP16, 128, 4096, 4096), (FP32, 72, 4096, 4096),
    (BF16, 72, 1000, 1000), (FP16, 64, 257, 257), (FP32, 128, 1000, 257),
]
# 16 heads, as gpu_check times them: Triton specialises integer arguments (H among them) by divisibility
# by 16, so the timings reuse the kernels these tests compile.
HEADS = 16


@pytest.mark.parametrize("dtype, d, n_q, n_kv", [pytest.param(*c, id=_id(*c)) for c in ATTENTION])
def test_attention_forward_tangent_and_backward(dtype, d, n_q, n_kv, record_property):
    B, H = (2 if max(n_q, n_kv) <= 1024 else 1), HEADS
    q, tq = (torch.randn(B, H, n_q, d, device=CUDA, dtype=dtype) for _ in range(2))
    k, v, tk, tv = (torch.randn(B, H, n_kv, d, device=CUDA, dtype=dtype) for _ in range(4))
    cot = torch.randn(B, H, n_q, d, device=CUDA, dtype=dtype)
    inputs = (q, k, v, tq, tk, tv, cot)
    _check_attention(Checks(record_property, dtype), _kernel_outputs(*inputs), _torch_outputs(*inputs),
                     _truth(*inputs))


def _qkv_views(B, H, n, d, dtype):
    """q, k, v as a model makes them: permuted views of one [B, N, 3, H, d] projection (not contiguous;
    unit last stride)."""
    qkv = torch.randn(B, n, 3, H, d, device=CUDA, dtype=dtype).permute(2, 0, 3, 1, 4)
    assert not qkv[0].is_contiguous() and qkv[0].stride(-1) == 1
    return qkv[0], qkv[1], qkv[2]


@pytest.mark.parametrize("dtype, d, n", [pytest.param(*c, id=_id(*c)) for c in
                                         [(BF16, 72, 1000), (FP16, 64, 257), (FP32, 128, 1024)]])
def test_attention_on_views_of_a_qkv_projection(dtype, d, n, record_property):
    B, H = 2, HEADS
    inputs = (*_qkv_views(B, H, n, d, dtype), *_qkv_views(B, H, n, d, dtype),
              torch.randn(B, H, n, d, device=CUDA, dtype=dtype))
    _check_attention(Checks(record_property, dtype), _kernel_outputs(*inputs), _torch_outputs(*inputs),
                     _truth(*inputs))


@pytest.mark.parametrize("dtype, d, n", [pytest.param(BF16, 64, 1000, id="bf16-64-1000")])
def test_attention_with_a_key_padding_mask(dtype, d, n, record_property):
    """Padded sequences (``key_mask``, True = the key takes part): every sample keeps a different number of
    keys, at least one, so no row is empty (where SDPA gives NaN and the kernels 0)."""
    B, H = 3, HEADS
    inputs = [torch.randn(B, H, n, d, device=CUDA, dtype=dtype) for _ in range(7)]
    key_mask = torch.arange(n, device=CUDA)[None, :] < torch.tensor([[n], [n // 2 + 3], [17]], device=CUDA)
    _check_attention(Checks(record_property, dtype), _kernel_outputs(*inputs, key_mask=key_mask),
                     _torch_outputs(*inputs, key_mask=key_mask), _truth(*inputs, key_mask=key_mask))


@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16")])
def test_attention_over_2_31_elements(dtype, record_property):
    """B·H·N·d > 2^31 per tensor (q, k, v views of a 6.4·10^9-element projection): the int64 batch/head
    offsets. The whole batch runs; heads on both sides of the 2^31-element mark are checked."""
    B, H, n, d = 2049, HEADS, 1024, 64
    assert B * H * n * d > 2**31
    q, k, v = _qkv_views(B, H, n, d, dtype)
    tq, tk, tv, cot = (torch.randn(B, H, n, d, device=CUDA, dtype=dtype) for _ in range(4))
    heads = [(0, 0), (1024, 7), (2047, 15), (2048, 15)]
    assert (heads[-1][0] * H + heads[-1][1]) * n * d > 2**31     # the last one starts past 2^31 elements
    b, h = (torch.tensor(column, device=CUDA) for column in zip(*heads, strict=True))

    def pick(t):
        return t[b, h].unsqueeze(1)                   # [4, 1, N, d]

    mine = _kernel_outputs(q, k, v, tq, tk, tv, cot, pick=pick)
    few = [pick(t) for t in (q, k, v, tq, tk, tv, cot)]
    _check_attention(Checks(record_property, dtype), mine, _torch_outputs(*few), _truth(*few))


# --------------------------------------------------------------------------------------------------
# The DPM-Solver++ step
# --------------------------------------------------------------------------------------------------
def _fused_step(*tensors, **kwargs):
    with dispatch.forced("dpm_solver_step", "triton"):
        out = dpm_solver_pp_step(*tensors, **kwargs)
    assert dispatch.last_implementation("dpm_solver_step") == "triton"
    return out


def _per_sample(coeffs, B):
    """Per-sample coefficients around ``coeffs`` (each sample its own step size), float64 [B] on the GPU."""
    spread = torch.linspace(0.8, 1.2, B, dtype=torch.float64, device=CUDA)
    return tuple(c * spread for c in coeffs)


def _truth_step(tensors, coeffs):
    shape = (-1,) + (1,) * (tensors[0].ndim - 1)
    return sum((c.view(shape) if torch.is_tensor(c) else c) * t.double() for c, t in zip(coeffs, tensors, strict=False))


@pytest.mark.parametrize("dtype, order, shape", [pytest.param(dt, o, s, id=_id(dt, f"order{o}", "x".join(map(str, s))))
                                                 for dt in ALL for o in (1, 2, 3)
                                                 for s in ((64, 4, 64, 64), (3, 5, 1000, 257))])
def test_dpm_step_matches_truth(dtype, order, shape, record_property):
    """Scalar coefficients, on the SD-latent batch and on an odd size (a masked tail program)."""
    tensors = [3 * torch.randn(shape, device=CUDA, dtype=dtype) for _ in range(order + 1)]
    coeffs = COEFFS[order]
    truth = _truth_step(tensors, coeffs)
    checks = Checks(record_property, dtype)
    checks("step", ErrorStats.of(_fused_step(*tensors, coeffs=coeffs), truth),
           ErrorStats.of(dpm_solver_step_torch(*tensors, coeffs=coeffs), truth))
    checks.verify()


@pytest.mark.parametrize("dtype", [pytest.param(dt, id=_id(dt)) for dt in ALL])
def test_dpm_step_per_sample_strided_inputs_slot_and_in_place(dtype, record_property):
    """Per-sample coefficients, channels-last (non-contiguous) inputs, the second store into a pair-buffer
    slot, and the in-place update: all the same values."""
    B = 64
    tensors = [3 * torch.randn(B, 64, 64, 4, device=CUDA, dtype=dtype).permute(0, 3, 1, 2) for _ in range(4)]
    assert not tensors[0].is_contiguous()
    coeffs = _per_sample(COEFFS[3], B)
    buffer = torch.zeros(B, 5, 4, 64, 64, device=CUDA, dtype=dtype)
    fused = _fused_step(*tensors, coeffs=coeffs, slot=buffer[:, 2])
    truth = _truth_step(tensors, coeffs)
    checks = Checks(record_property, dtype)
    checks("step", ErrorStats.of(fused, truth), ErrorStats.of(dpm_solver_step_torch(*tensors, coeffs=coeffs), truth))
    checks.verify()
    assert torch.equal(buffer[:, 2], fused)
    assert buffer[:, [0, 1, 3, 4]].count_nonzero() == 0
    x = tensors[0].contiguous()
    _fused_step(x, *tensors[1:], coeffs=coeffs, out=x)
    assert torch.equal(x, fused)


@pytest.mark.parametrize("samples", [pytest.param(2, id="bf16-two-samples-order3-slot"),
                                     pytest.param(1, id="bf16-one-sample-order1")])
def test_dpm_step_over_2_31_elements(samples, record_property):
    """More than 2^31 elements: two samples of 2^30 + 4097 (order 3, per-sample coefficients, a slot store:
    the int32 in-sample division after an int64 sample start), or one sample of 2^31 + 4097 (the all-int64
    path). ~30 GB. Errors measured chunk by chunk against the float64 truth and the eager formula."""
    dtype = BF16
    per = 2**30 + 4097 if samples == 2 else 2**31 + 4097
    order = 3 if samples == 2 else 1
    tensors = [3 * torch.randn(samples, per, device=CUDA, dtype=dtype) for _ in range(order + 1)]
    assert tensors[0].numel() > 2**31
    coeffs = _per_sample(COEFFS[order], samples)
    buffer = torch.zeros(samples, 2, per, device=CUDA, dtype=dtype) if samples == 2 else None
    fused = _fused_step(*tensors, coeffs=coeffs, slot=None if buffer is None else buffer[:, 1])
    mine = theirs = None
    for start in range(0, per, 2**27):
        chunk = [t[:, start:start + 2**27] for t in tensors]
        truth = _truth_step(chunk, coeffs)
        m = ErrorStats.of(fused[:, start:start + 2**27], truth)
        t = ErrorStats.of(dpm_solver_step_torch(*chunk, coeffs=coeffs), truth)
        mine, theirs = (m, t) if mine is None else (mine + m, theirs + t)
    checks = Checks(record_property, dtype)
    checks("step", mine, theirs)
    checks.verify()
    if buffer is not None:
        assert torch.equal(buffer[:, 1], fused) and buffer[:, 0].count_nonzero() == 0


# --------------------------------------------------------------------------------------------------
# The feature distance (CUDA extension)
# --------------------------------------------------------------------------------------------------
FEATURES = [(dt, s, layout) for dt in ALL for s, layout in (((8, 64, 128, 128), "contiguous"),
                                                             ((8, 512, 16, 16), "channels_last"),
                                                             ((3, 96, 33, 17), "channels_last"))]


@pytest.mark.parametrize("dtype, shape, layout", [pytest.param(*c, id=_id(c[0], "x".join(map(str, c[1])), c[2]))
                                                  for c in FEATURES])
def test_feature_distance_forward_and_backward(dtype, shape, layout, record_property):
    """The per-tap (E)LatentLPIPS distance and its gradients at VGG-tap sizes, NCHW and channels-last.
    Floor for fp32: log2(C·H·W) ulps, the rounding bound of a reduction over C·H·W terms in any fixed order
    (the op's two-stage order and PyTorch's differ)."""
    reason = perceptual.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"the CUDA extension is not built here: {reason}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    f0, f1 = (torch.randn(shape, device=CUDA, dtype=dtype).to(memory_format=fmt) for _ in range(2))
    weights = torch.rand(shape[1], device=CUDA, dtype=dtype)
    cot = torch.rand(shape[0], device=CUDA, dtype=dtype)

    def run(fn, a, b, w):
        leaves = [x.detach().requires_grad_() for x in (a, b)]
        d = fn(*leaves, w)
        d.backward(cot.to(d.dtype))
        return {"distance": d, "grad f0": leaves[0].grad, "grad f1": leaves[1].grad}

    with dispatch.forced("feature_distance", "cuda"):
        mine = run(perceptual.feature_distance, f0, f1, weights)
    theirs = run(perceptual.reference, f0, f1, weights)
    truth = run(perceptual.reference, f0.double(), f1.double(), weights.double())
    floor = math.log2(math.prod(shape[1:])) if dtype == FP32 else 1.0
    checks = Checks(record_property, dtype, floor_ulps=floor)
    for name, value in mine.items():
        checks(name, ErrorStats.of(value, truth[name]), ErrorStats.of(theirs[name], truth[name]))
    checks.verify()
