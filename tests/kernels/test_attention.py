"""kernels.attention (Triton, run through TRITON_INTERPRET=1 from conftest) and kernels.patch.sdpa.

Accuracy is judged against float64 truth, relative to PyTorch's own error in the same dtype: math attention
computed in that dtype (forward, torch.func.jvp and backward) has some error against the truth; the
kernel's must be within a small factor of it. Shapes have odd lengths, N_q ≠ N_kv and head dims 16–128.
"""
import copy
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as original_sdpa

import kernels.attention as ja
from engine.config import load_config
from engine.models.layers import SelfAttention
from engine.stages.post import PostTraining
from kernels import dispatch
from kernels.attention import JVPAttention, attention_jvp, attention_reference, jvp_attention
from kernels.attention import scaled_dot_product_attention as attention
from kernels.patch.sdpa import patch_sdpa


def triton():
    return dispatch.forced("attention", "triton")


SHAPES = [  # (B, H, N_q, N_kv, d): tails in both block axes, N_q < N_kv and N_q > N_kv
    (2, 2, 37, 37, 32),
    (1, 2, 5, 70, 16),
    (1, 1, 33, 17, 64),
    (1, 1, 9, 21, 128),
    (1, 2, 21, 35, 72),    # DiT-XL/2, SiT-XL/2, MF-XL/2: a 64 + 16 split of the head dim (8 padded columns)
    (1, 1, 11, 13, 40),    # 32 + 16
]
FACTOR = 4   # kernel error ≤ FACTOR × PyTorch's error in the same dtype (measured ratios are ≤ ~2.2)


def _inputs(B, H, n_q, n_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    return (r(n_q), r(n_kv), r(n_kv)), (r(n_q), r(n_kv), r(n_kv))


def _err(a, truth):
    return (a.double() - truth).abs().max().item()


@pytest.fixture(autouse=True)
def _fresh_dispatch_record(monkeypatch):
    monkeypatch.setattr(dispatch, "_counts", dispatch.Counter())
    monkeypatch.setattr(dispatch, "_last", {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_tangent_and_grads_match_truth(dtype, shape):
    """O and dO (torch.func.jvp through the autograd.Function, and the fused attention_jvp pass) and the
    gradients of a random cotangent against float64 math attention, within FACTOR × PyTorch's error."""
    (q, k, v), (tq, tk, tv) = _inputs(*shape)
    o_true, do_true = torch.func.jvp(attention_reference, (q, k, v), (tq, tk, tv))
    lo = lambda *xs: tuple(x.to(dtype) for x in xs)
    o_pt, do_pt = torch.func.jvp(attention_reference, lo(q, k, v), lo(tq, tk, tv))
    with triton():
        o, do = torch.func.jvp(jvp_attention, lo(q, k, v), lo(tq, tk, tv))
    o_f, do_f = attention_jvp(*lo(q, k, v, tq, tk, tv))
    assert dispatch.last_implementation("attention") == "triton"
    assert o.dtype == do.dtype == dtype
    for mine, torch_own, truth in ((o, o_pt, o_true), (do, do_pt, do_true), (o_f, o_pt, o_true),
                                   (do_f, do_pt, do_true)):
        assert _err(mine, truth) <= FACTOR * _err(torch_own, truth)

    cot = torch.randn(o_true.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = lambda xs: [x.clone().requires_grad_() for x in xs]
    truth_in, pt_in, mine_in = leaves((q, k, v)), leaves(lo(q, k, v)), leaves(lo(q, k, v))
    attention_reference(*truth_in).backward(cot)
    attention_reference(*pt_in).backward(cot.to(dtype))
    with triton():
        jvp_attention(*mine_in).backward(cot.to(dtype))
    for mine, torch_own, truth in zip(mine_in, pt_in, truth_in):
        assert mine.grad.dtype == dtype
        assert _err(mine.grad, truth.grad) <= FACTOR * _err(torch_own.grad, truth.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tangent_is_insensitive_to_a_common_row_offset_in_ds(dtype):
    """dO depends on dS only through dS − μ (row-wise), so a per-row constant in dS — here a large shared
    component w of every key's tangent, q·(dk_j + w)ᵀ = q·dk_jᵀ + q·wᵀ — cancels. The kernel forms
    P·(dS − ref) in fp32 before rounding to the IO dtype, so its error with the offset must stay within
    FACTOR × PyTorch's error without it; rounding P·dS itself (the old kernel) gave ~15× PyTorch's error
    here. Truths are float64 evaluations of the rounded inputs, so input rounding (which a large w
    amplifies in dk + w) is nobody's error. Both the jvp rule (MODE 2) and the fused pass (MODE 1)."""
    shape = (1, 2, 37, 45, 32)
    (q, k, v), (tq, tk, tv) = _inputs(*shape, seed=3)
    w = 40 * torch.randn(1, 2, 1, shape[-1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q, k, v, tq, tk, tv, tk_off = (x.to(dtype) for x in (q, k, v, tq, tk, tv, tk + w))
    hi = lambda *xs: tuple(x.double() for x in xs)
    offset = (q.double() @ w.transpose(-2, -1)) * shape[-1] ** -0.5      # [1, 2, N_q, 1]: dS's row offset
    ds = (tq.double() @ k.double().transpose(-2, -1) + q.double() @ tk.double().transpose(-2, -1)) * shape[-1] ** -0.5
    assert offset.abs().mean() > 10 * ds.std()
    _, truth = torch.func.jvp(attention_reference, hi(q, k, v), hi(tq, tk, tv))
    _, truth_off = torch.func.jvp(attention_reference, hi(q, k, v), hi(tq, tk_off, tv))
    _, do_pt = torch.func.jvp(attention_reference, (q, k, v), (tq, tk, tv))
    with triton():
        _, do_jvp = torch.func.jvp(jvp_attention, (q, k, v), (tq, tk_off, tv))
    _, do_fused = attention_jvp(q, k, v, tq, tk_off, tv)
    budget = FACTOR * _err(do_pt, truth)
    assert _err(do_jvp, truth_off) <= budget
    assert _err(do_fused, truth_off) <= budget


def test_grid_is_one_axis_with_the_blocks_of_a_head_together():
    """One launch axis (2^31 − 1 programs; axes 1 and 2 stop at 65535) holding every (batch, head)'s blocks:
    B·H = 70,000 launches, recorded without running the kernels. The kernels read the block as
    pid % blocks and the (batch, head) as pid // blocks (correctness is every other test here)."""
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    B, H, n, d = 7000, 10, 40, 1
    q = torch.zeros(B, H, n, d)
    lse = torch.zeros(B, H, n)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("_fwd_kernel", "_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
            mp.setattr(ja, name, Recorder())
        for mode in (0, 1, 2):
            ja._fwd(q, q, q, 1.0, mode, tangents=(q, q, q), o=q, lse=lse)
        ja._bwd(q, q, q, q, lse, q, 1.0)
        assert len(grids) == 6
        for grid in grids:
            assert len(grid) == 1 and grid[0] % (B * H) == 0 and grid[0] > B * H
        grids.clear()
        ja._bwd(q, q, q, q, lse, q, 1.0, needs=(False, False, True))     # dv only: no dq pass
        assert len(grids) == 2
    with pytest.raises(ValueError, match="grid limit"):
        ja._grid(2**16, 2**15)


def test_strided_inputs_as_self_attention_makes_them():
    """q, k, v permuted out of one qkv projection (SelfAttention's layout), a stride-0 (expanded) tangent,
    jvp and backward through the whole block, against the same block on math attention."""
    torch.manual_seed(0)
    block = SelfAttention(48, num_heads=3, zero_init=False)
    x, tx = torch.randn(2, 29, 48), torch.randn(2, 29, 48)
    q, _, _ = block.qkv(x).reshape(2, 29, 3, 3, 16).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() and q.stride(-1) == 1

    def run(attn_fn):
        net = copy.deepcopy(block)
        net.attn_fn = attn_fn
        y, dy = torch.func.jvp(net, (x,), (tx,))
        (y.square().sum() + (y * dy.detach()).sum()).backward()
        return y, dy, [p.grad for p in net.parameters()]

    ref = run(attention_reference)
    with triton():
        got = run(JVPAttention())
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    (q, k, v), (tq, tk, _) = _inputs(1, 2, 19, 19, 32)
    q, k, v, tq, tk = (t.float() for t in (q, k, v, tq, tk))
    tv = torch.ones(1, dtype=torch.float32).expand_as(v)       # strides all 0
    want = torch.func.jvp(attention_reference, (q, k, v), (tq, tk, tv))
    with triton():
        got = torch.func.jvp(jvp_attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backward_through_the_tangent_raises():
    """The kernel has no second-order rule: differentiating dO must fail loudly, not return zeros."""
    (q, k, v), (tq, tk, tv) = _inputs(1, 1, 8, 8, 16)
    q = q.float().requires_grad_()
    with triton():
        _, do = torch.func.jvp(jvp_attention, (q, k.float(), v.float()), (tq.float(), tk.float(), tv.float()))
    with pytest.raises(RuntimeError, match="through the attention tangent"):
        do.sum().backward()


def test_dispatch_choice_and_errors(monkeypatch):
    (q, k, v), _ = _inputs(1, 2, 7, 7, 16)
    # auto on CPU: the torch reference (float64 too), observable; the model-facing choice
    # kernels.attention.scaled_dot_product_attention records as well.
    torch.testing.assert_close(jvp_attention(q, k, v), attention_reference(q, k, v))
    assert dispatch.last_implementation("attention") == "torch"
    qf, kf, vf = q.float(), k.float(), v.float()
    with triton():
        out = attention(qf, kf, vf)
        assert dispatch.last_implementation("attention") == "triton"
        torch.testing.assert_close(out, attention_reference(qf, kf, vf), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="float64"):
            jvp_attention(q, k, v)
        with pytest.raises(ValueError, match="head dim 256"):
            jvp_attention(*(torch.zeros(1, 1, 4, 256),) * 3)
        with pytest.raises(ValueError, match="one shape"):
            jvp_attention(qf, kf, vf[:, :, :5])
        monkeypatch.setattr(ja, "INTERPRETED", False)      # as on a CPU-only machine without the flag
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            jvp_attention(qf, kf, vf)
    assert dispatch.implementations_run() == {"attention:torch": 1, "attention:triton": 1}


# --------------------------------------------------------------------------------------------------
# Must-show #3: a MeanFlow post-training step on the small DiT through the kernel
# --------------------------------------------------------------------------------------------------
def test_meanflow_step_on_dit_with_the_kernel_matches_reference(randomize):
    """torch.func.jvp through the DiT (head dim 32, 49 tokens: tails in both block axes) with attention
    forced to the triton kernel gives the reference's u, du/dt, loss (rel 1e-5) and parameter gradients
    (within 1e-5 of each tensor's largest entry)."""
    cfg = load_config(None, ["data.resolution=14", "network.arch=dit", "network.dit.hidden_size=64",
                             "network.dit.depth=2", "network.dit.num_heads=2", "post.init=random",
                             "post.method=meanflow", "network.use_r=true"])
    stage = PostTraining(cfg)
    randomize(stage.model.net, std=0.1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 14, 14, generator=g).clamp(-1, 1)
    z, v = torch.randn(2, 1, 14, 14, generator=g), torch.randn(2, 1, 14, 14, generator=g)
    r, t = torch.tensor([0.1, 0.5]), torch.tensor([0.6, 0.5])

    def step(impl):
        model = copy.deepcopy(stage.model)
        with dispatch.forced("attention", impl):
            u, dudt = stage.meanflow_jvp(model, z, v, r, t)
            loss = stage.loss(model, stage.prepare({"images": x0}, torch.Generator().manual_seed(3)))
            loss.backward()
        assert dispatch.implementations_run(reset=True) == {f"attention:{impl}": 2 * cfg.network.dit.depth}
        return u, dudt, loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    u0, dudt0, loss0, grads0 = step("torch")
    u1, dudt1, loss1, grads1 = step("triton")
    assert dudt0.abs().max() > 0.1
    torch.testing.assert_close(u1, u0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dudt1, dudt0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    assert any(gr.abs().max() > 0 for gr in grads0.values())
    for name, want in grads0.items():
        torch.testing.assert_close(grads1[name], want, rtol=0, atol=1e-5 * want.abs().max().item(), msg=name)


# --------------------------------------------------------------------------------------------------
# Must-show #4: the SDPA patcher on a model that calls F.scaled_dot_product_attention itself
# --------------------------------------------------------------------------------------------------
class SDPAModel(nn.Module):
    """diffusers/timm style: calls F.scaled_dot_product_attention directly."""

    def __init__(self, channels=32, heads=2, **sdpa_kwargs):
        super().__init__()
        self.heads, self.sdpa_kwargs = heads, sdpa_kwargs
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)
        self.side_thread_calls = []   # if set to [tensor], also call SDPA from another thread in forward

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        for t in self.side_thread_calls:
            th = threading.Thread(target=lambda: F.scaled_dot_product_attention(t, t, t))
            th.start()
            th.join()
        o = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def test_patch_sdpa_routes_jvp_and_reverts():
    torch.manual_seed(0)
    model = SDPAModel()
    x, tx = torch.randn(2, 23, 32), torch.randn(2, 23, 32)
    original = F.scaled_dot_product_attention
    with sdpa_kernel([SDPBackend.MATH]):     # the unpatched model under jvp needs the math backend
        want = torch.func.jvp(model, (x,), (tx,))

    handle = patch_sdpa(model)
    assert F.scaled_dot_product_attention is original          # swapped only while the forward runs
    model.side_thread_calls = [torch.randn(1, 1, 4, 16)]        # another thread's call: not routed
    with triton():
        got = torch.func.jvp(model, (x,), (tx,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dispatch.last_implementation("attention") == "triton"
    assert dispatch.implementations_run(reset=True) == {"attention:triton": 1}
    assert F.scaled_dot_product_attention is original

    handle.revert()
    handle.revert()                                            # idempotent
    assert F.scaled_dot_product_attention is original
    with triton(), sdpa_kernel([SDPBackend.MATH]):
        torch.testing.assert_close(torch.func.jvp(model, (x,), (tx,)), want)
    assert dispatch.implementations_run() == {}                # the model uses the original SDPA again


def test_patch_sdpa_fallbacks_nesting_and_exceptions():
    torch.manual_seed(0)
    x = torch.randn(1, 9, 32)
    causal = SDPAModel(is_causal=True)
    want = causal(x)
    original = F.scaled_dot_product_attention
    outer = nn.Sequential(causal, SDPAModel())
    with patch_sdpa(outer), patch_sdpa(outer[1], route_plain_calls=True), triton():   # nested patches
        torch.testing.assert_close(causal(x), want)            # only patched forwards are routed ...
        assert dispatch.implementations_run(reset=True) == {}
        outer(x)                                               # ... is_causal falls back; the inner patch
        assert dispatch.implementations_run(reset=True) == {"attention:torch": 1, "attention:triton": 1}
        assert F.scaled_dot_product_attention is original      # routes plain calls, the outer does not
    with patch_sdpa(outer[1]), triton():
        outer(x)
        assert dispatch.implementations_run(reset=True) == {"attention:torch": 1}

    broken = SDPAModel()
    broken.proj = None                                         # the forward raises after the SDPA call
    with patch_sdpa(broken), pytest.raises(TypeError):
        broken(x)
    assert F.scaled_dot_product_attention is original
    with pytest.raises(TypeError, match="nn.Module"):
        patch_sdpa(lambda q: q)


class MaskedSDPAModel(nn.Module):
    """A text-encoder style block: a key-padding mask, optional causal / GQA / dropout / scale, any dtype."""

    def __init__(self, channels=32, heads=4, kv_heads=4, **sdpa_kwargs):
        super().__init__()
        self.heads, self.kv_heads, self.sdpa_kwargs = heads, kv_heads, sdpa_kwargs
        d = channels // heads
        self.q, self.kv = nn.Linear(channels, channels), nn.Linear(channels, 2 * kv_heads * d)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)
        return o.transpose(1, 2).reshape(b, n, c)


def _padding_mask(b, n, lengths):
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]      # [B, N] keys that take part
    return keep[:, None, None, :]


@pytest.mark.parametrize("case", ["float_mask", "query_mask", "causal", "gqa", "dropout", "head_dim_160", "float64"])
def test_patch_sdpa_runs_what_it_does_not_route_through_math_under_jvp(case):
    """Calls the kernel does not take fail under torch.func.jvp on the fused CPU/GPU backends; inside a
    patched forward they run SDPA's math backend, exactly (float64) as the unfused formula."""
    torch.manual_seed(0)
    dtype = torch.float64 if case == "float64" else torch.float32
    kwargs = {"causal": dict(is_causal=True), "gqa": dict(kv_heads=2, enable_gqa=True),
              "head_dim_160": dict(channels=320, heads=2, kv_heads=2), "dropout": dict(dropout_p=0.3)}.get(case, {})
    model = MaskedSDPAModel(**kwargs).to(dtype)
    c = 320 if case == "head_dim_160" else 32
    x, tx = torch.randn(2, 11, c, dtype=dtype), torch.randn(2, 11, c, dtype=dtype)
    mask = {"float_mask": torch.randn(2, 1, 11, 11, dtype=dtype),
            "query_mask": torch.rand(2, 1, 11, 11) > 0.3,         # not a key-padding mask: math
            "float64": _padding_mask(2, 11, [11, 6])}.get(case)
    exact = copy.deepcopy(model).double()
    with sdpa_kernel([SDPBackend.MATH]):                            # forced for the whole process
        want = torch.func.jvp(lambda x: exact(x, _double(mask)), (x.double(),), (tx.double(),))
        torch.manual_seed(1)
        want_same_dtype = torch.func.jvp(lambda x: model(x, mask), (x,), (tx,))
    with patch_sdpa(model), triton():
        torch.manual_seed(1)                                        # the same dropout mask
        got = torch.func.jvp(lambda x: model(x, mask), (x,), (tx,))
    assert dispatch.implementations_run(reset=True) == {"attention:torch": 1}
    torch.testing.assert_close(got, want_same_dtype, rtol=0, atol=0)
    if case == "dropout":
        assert not torch.allclose(got[0], want[0].float(), atol=1e-3)      # dropout took effect
        return
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close([t.double() for t in got], want, rtol=tol, atol=tol)


def test_unpatched_masked_sdpa_fails_under_jvp():
    """What the patch fixes, on CPU: the fused backend SDPA picks for a padding-masked call has no forward-mode
    rule. In a fresh process: after this error functorch's state is unusable (a later jvp crashes)."""
    script = (
        "import torch, torch.nn.functional as F\n"
        "q = torch.randn(2, 4, 11, 8); m = (torch.arange(11) < 6)[None, None, None, :].expand(2, 1, 1, 11)\n"
        "torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=m), (q,), (q,))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Trying to use forward AD with _scaled_dot_product" in res.stderr


def _double(mask):
    return mask.double() if mask is not None and mask.is_floating_point() else mask


def test_patch_sdpa_leaves_plain_forward_and_backward_to_the_original(monkeypatch):
    """No jvp, default patch: the model's own SDPA (flash / cuDNN on GPU) runs, forward and backward, bit
    for bit as unpatched; with route_plain_calls=True the kernel takes the same calls."""
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return original_sdpa(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    torch.manual_seed(0)
    model, x = SDPAModel(), torch.randn(2, 19, 32, requires_grad=True)
    want = model(x)
    want_grad = torch.autograd.grad(want.square().sum(), [x, *model.parameters()])
    calls.clear()
    with patch_sdpa(model), triton():
        got = model(x)
        got_grad = torch.autograd.grad(got.square().sum(), [x, *model.parameters()])
    assert len(calls) == 1 and dispatch.implementations_run(reset=True) == {"attention:torch": 1}
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    calls.clear()
    with patch_sdpa(model, route_plain_calls=True), triton():
        routed = model(x)
        routed_grad = torch.autograd.grad(routed.square().sum(), [x, *model.parameters()])
    assert calls == [] and dispatch.implementations_run(reset=True) == {"attention:triton": 1}
    torch.testing.assert_close(routed, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_grad, want_grad, rtol=1e-4, atol=1e-5)


def _counting(monkeypatch, *names):
    """Count the launches of the named kernels (still running them)."""
    launches = {name: 0 for name in names}
    for name in names:
        kernel = getattr(ja, name)

        class Counted:
            def __getitem__(self, grid, name=name, kernel=kernel):
                launches[name] += 1
                return kernel[grid]
        monkeypatch.setattr(ja, name, Counted())
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_padding_mask_in_the_kernel_under_jvp_and_backward(dtype):
    """A bool [B, N_kv] key mask: O, dO (torch.func.jvp and the fused pass) and gradients equal float64 math
    attention on the kept keys, within FACTOR × PyTorch's error; a row with no key left gives 0."""
    (q, k, v), (tq, tk, tv) = _inputs(3, 2, 19, 37, 72)
    keep = torch.arange(37)[None, :] < torch.tensor([37, 5, 0])[:, None]     # full, 5 keys, none
    keep[0, 17] = False                                                       # a hole mid-sequence
    g = torch.randn(3, 2, 19, 72, dtype=torch.float64)

    def run(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        o, do = torch.func.jvp(lambda a, b, c: fn(a, b, c, None, keep), tuple(xs[:3]), tuple(xs[3:]))
        grads = torch.autograd.grad(o, xs[:3], g.to(o.dtype))
        return o, do, grads

    truth = run(attention_reference, q, k, v, tq, tk, tv)
    low = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    torch_low = run(attention_reference, *low)
    with triton():
        got = run(jvp_attention, *low)
    fused = attention_jvp(*low, key_mask=keep)
    for name, a, want, pt in [("O", got[0], truth[0], torch_low[0]), ("dO", got[1], truth[1], torch_low[1]),
                              ("fused O", fused[0], truth[0], torch_low[0]),
                              ("fused dO", fused[1], truth[1], torch_low[1])] + [
            (f"grad {i}", got[2][i], truth[2][i], torch_low[2][i]) for i in range(3)]:
        assert _err(a, want) <= FACTOR * _err(pt, want) + 1e-6, name
    for t in (got[0][2], got[1][2], got[2][0][2], got[2][1][2], got[2][2][2], fused[0][2], fused[1][2]):
        assert torch.equal(t, torch.zeros_like(t))                          # batch 2: no key at all
    assert torch.equal(got[2][1][1, :, 5:], torch.zeros_like(got[2][1][1, :, 5:]))   # masked keys get no grad


def test_patch_sdpa_routes_key_padding_masks_to_the_kernel():
    torch.manual_seed(0)
    model = MaskedSDPAModel(channels=64, heads=2, kv_heads=2)
    x, tx = torch.randn(2, 11, 64), torch.randn(2, 11, 64)
    mask = _padding_mask(2, 11, [11, 6])
    with sdpa_kernel([SDPBackend.MATH]):
        want = torch.func.jvp(lambda x: model(x, mask), (x,), (tx,))
    with patch_sdpa(model), triton():
        got = torch.func.jvp(lambda x: model(x, mask), (x,), (tx,))
    assert dispatch.implementations_run(reset=True) == {"attention:triton": 1}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backward_runs_only_the_passes_its_gradients_need(monkeypatch):
    """Gradients for q only: no key-block pass; for v only: no query-block pass (and no dO·vᵀ)."""
    launches = _counting(monkeypatch, "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    (q, k, v), _ = _inputs(1, 2, 13, 17, 32)
    q, k, v = (t.float() for t in (q, k, v))
    g = torch.randn(1, 2, 13, 32)
    for wants, passes in [((True, False, False), {"_bwd_dkdv_kernel": 0, "_bwd_dq_kernel": 1}),
                          ((False, False, True), {"_bwd_dkdv_kernel": 1, "_bwd_dq_kernel": 0}),
                          ((False, True, False), {"_bwd_dkdv_kernel": 1, "_bwd_dq_kernel": 0})]:
        xs = [t.clone().requires_grad_(w) for t, w in zip((q, k, v), wants)]
        with triton():
            grads = torch.autograd.grad(jvp_attention(*xs), [x for x in xs if x.requires_grad], g)
        ref = [x.detach().requires_grad_(x.requires_grad) for x in xs]
        want = torch.autograd.grad(attention_reference(*ref), [x for x in ref if x.requires_grad], g)
        torch.testing.assert_close(grads, want, rtol=1e-4, atol=1e-5)
        assert launches == passes
        launches.update({name: 0 for name in launches})


def test_head_dim_split_and_vector_width():
    """72 → 64 + 16 (80 MMA columns, not 128), 40 → 32 + 16, powers of two whole; 16-byte rows when every
    tensor allows, else scalar indexing, which the kernels must get right too."""
    assert [ja._head_split(d) for d in (8, 16, 40, 56, 64, 72, 88, 96, 128)] == [
        (16, 0), (16, 0), (32, 16), (64, 0), (64, 0), (64, 16), (64, 32), (64, 32), (128, 0)]
    base = torch.randn(1, 2, 23, 41, dtype=torch.float64)
    q = base[..., :40].float()                                     # contiguous copy: rows of 40 floats
    odd = torch.randn(1, 2, 23, 41)[..., :40]                      # a view: rows 41 floats apart
    assert ja._vec(q) == 4 and ja._vec(q.half()) == 8 and ja._vec(odd) == 1
    tq = torch.randn_like(odd)
    want = torch.func.jvp(attention_reference, (odd.double(),) * 3, (tq.double(),) * 3)
    with triton():
        got = torch.func.jvp(jvp_attention, (odd,) * 3, (tq,) * 3)
    torch.testing.assert_close([t.double() for t in got], want, rtol=1e-4, atol=1e-5)
