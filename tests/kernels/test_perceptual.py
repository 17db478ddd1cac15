"""The fused feature-distance op (kernels/perceptual.py over csrc/: kernels._C / kernels._cuda) against its
PyTorch reference."""
import importlib
import os

import pytest
import torch

import kernels.perceptual as fd
from kernels import dispatch

pytestmark = pytest.mark.skipif(fd.unavailable_reason("cpp") is not None,
                                reason=f"CPU extension not built: {fd.unavailable_reason('cpp')}")

SHAPES = [(2, 3, 1, 5), (3, 37, 7, 5), (2, 16, 4, 4)]


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if kind == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if kind == "permuted":                        # dense but neither NCHW nor NHWC: [B, W, C, H] storage
        return x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    if kind == "sliced":                          # gaps in memory: every other channel of a wider map
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.clone()


def pair(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype),
            torch.rand(shape[1], generator=g, dtype=dtype))


def fused(*args, **kwargs):
    with dispatch.forced("feature_distance", "cpp"):
        out = fd.feature_distance(*args, **kwargs)
    assert dispatch.last_implementation("feature_distance") == "cpp"
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fp32_forward_and_backward_match_the_reference(shape, kind, weighted):
    a, b, w = pair(shape)
    w = w if weighted else None
    f0, f1 = layout(a, kind).requires_grad_(True), layout(b, "contiguous").requires_grad_(True)
    r0, r1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out, ref = fused(f0, f1, w), fd.reference(r0, r1, w)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    upstream = torch.linspace(0.5, 1.5, shape[0])
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(f0.grad, r0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f1.grad, r1.grad, rtol=1e-5, atol=1e-6)
    if kind in ("channels_last", "permuted"):        # gradients come back in the input's layout
        assert f0.grad.stride() == f0.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_half_precision_is_at_least_as_accurate_as_pytorch_in_that_dtype(dtype, kind):
    """Truth = the float64 reference on the same (rounded) inputs; the fused op (fp32 accumulation) must be
    within 2x PyTorch's own error in that dtype, in the value and in the gradient."""
    a, b, w = pair((4, 64, 6, 5), dtype)
    exact = fd.reference(a.double(), b.double(), w.double())
    x0 = layout(a, kind).requires_grad_(True)
    out = fused(x0, b, w)
    ref = fd.reference(a, b, w)
    assert out.dtype == dtype
    ref_error = (ref.double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * ref_error + 1e-6

    t0 = a.double().requires_grad_(True)
    fd.reference(t0, b.double(), w.double()).sum().backward()
    r0 = a.clone().requires_grad_(True)
    fd.reference(r0, b, w).sum().backward()
    out.sum().backward()
    assert x0.grad.dtype == dtype
    ref_grad_error = (r0.grad.double() - t0.grad).abs().max().item()
    assert (x0.grad.double() - t0.grad).abs().max().item() <= 2 * ref_grad_error + 1e-6


@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_float64(weighted):
    a, b, w = pair((2, 5, 3, 4), torch.float64, seed=3)
    w = w if weighted else None
    f0, f1 = a.requires_grad_(True), b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: fused(x, y, w), (f0, f1))
    assert torch.autograd.gradcheck(lambda x: fused(x, b.detach(), w), (layout(a.detach(), "channels_last").requires_grad_(True),))


def test_gradient_for_f0_only_skips_f1_and_zero_features_stay_finite():
    a, b, _ = pair((2, 6, 3, 3), seed=4)
    f0 = a.clone().requires_grad_(True)
    fused(f0, b).sum().backward()
    r0 = a.clone().requires_grad_(True)
    fd.reference(r0, b).sum().backward()
    torch.testing.assert_close(f0.grad, r0.grad, rtol=1e-5, atol=1e-6)
    g0, g1 = torch.ops.cmt_csrc.feature_distance_backward(torch.ones(2), a, b, None, 1e-10, True, False)
    assert g1 is None and g0.shape == a.shape
    # an all-zero (dead ReLU) position: norm gradient 0 as in vector_norm, no NaN
    z = torch.zeros(1, 6, 2, 2, requires_grad=True)
    d = fused(z, b[:1, :, :2, :2])
    d.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(d).all()
    assert fused(a, a).abs().max() < 1e-6


def test_result_does_not_depend_on_the_thread_count():
    a, b, w = pair((3, 32, 20, 20), seed=5)
    torch.set_num_threads(1)
    one = fused(a, b, w)
    torch.set_num_threads(2)
    two = fused(a, b, w)
    assert torch.equal(one, two)


def test_errors_are_clear():
    a, b, w = pair((2, 4, 3, 3))
    with pytest.raises(ValueError, match="share one"):
        fused(a, b[:, :3])
    with pytest.raises(ValueError, match="3 channel weights for 4"):
        fused(a, b, w[:3])
    with pytest.raises(RuntimeError, match="f0 is Float but f1 is Double"):
        torch.ops.cmt_csrc.feature_distance(a, b.double(), None, 1e-10)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16/float64"):
        torch.ops.cmt_csrc.feature_distance(a.int(), b.int(), None, 1e-10)


def test_dispatch_auto_forced_and_fallback(monkeypatch):
    a, b, w = pair((2, 4, 3, 3))
    fd.feature_distance(a, b)
    assert dispatch.last_implementation("feature_distance") == "cpp"
    with dispatch.forced("feature_distance", "torch"):
        torch.testing.assert_close(fd.feature_distance(a, b, w), fd.reference(a, b, w))
    assert dispatch.last_implementation("feature_distance") == "torch"
    with dispatch.forced("feature_distance", "cuda"), pytest.raises(RuntimeError, match="CUDA tensors only"):
        fd.feature_distance(a, b)
    # heads that need a gradient: the fused op does not compute it, so auto uses the reference, forced raises
    wg = w.clone().requires_grad_(True)
    fd.feature_distance(a, b, wg).sum().backward()
    assert dispatch.last_implementation("feature_distance") == "torch" and wg.grad is not None
    with dispatch.forced("feature_distance", "cpp"), pytest.raises(RuntimeError, match="require a gradient"):
        fd.feature_distance(a, b, wg)
    # the extension missing: auto falls back with one warning, forcing it raises with the reason
    monkeypatch.setitem(fd._UNAVAILABLE, "cpp", "kernels._C did not import (test)")
    monkeypatch.setattr(fd, "_warned", set())
    with pytest.warns(RuntimeWarning, match="cpp extension is unavailable.*pip install"):
        fd.feature_distance(a, b)
    assert dispatch.last_implementation("feature_distance") == "torch"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd.feature_distance(a, b)                         # said once only
    with dispatch.forced("feature_distance", "cpp"), pytest.raises(RuntimeError, match=r"did not import \(test\)"):
        fd.feature_distance(a, b)


def test_opcheck_schema_autograd_and_fake_registrations():
    a, b, w = pair((2, 5, 3, 4), seed=6)
    torch.library.opcheck(torch.ops.cmt_csrc.feature_distance.default, (a.requires_grad_(True), b, w, 1e-10),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(torch.version.cuda is None or os.environ.get("CMT_SKIP_CUDA_BUILD") == "1",
                    reason="torch without CUDA (or CUDA build skipped): setup.py builds no CUDA extension")
def test_cuda_extension_imports_and_registers_cuda_kernels():
    """No GPU here: the kernels cannot run, but the library must have compiled, linked and loaded."""
    assert fd.unavailable_reason("cuda") is None, fd.unavailable_reason("cuda")
    importlib.import_module("kernels._cuda")
    for op in ("cmt_csrc::feature_distance", "cmt_csrc::feature_distance_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
