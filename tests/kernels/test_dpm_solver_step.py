"""The fused DPM-Solver++ step (kernels/dpm_solver_step.py), run by Triton's CPU interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton, so ``dispatch.forced(..., "triton")``
runs the real kernel body (its loads, masks, int64 offsets, stores) on CPU tensors. Accuracy is judged
against a float64 ground truth relative to the error of PyTorch's own reference in the same dtype.
"""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

import kernels.dpm_solver_step as kds
from benchmarks.counting import count_eager, count_triton, tensor_bytes
from engine.formulas.grids import edm_lambda_uniform_sigmas
from engine.sampling.solvers import dpm_solver_pp
from engine.stages.rollout import consistency_pairs
from kernels import dispatch
from kernels.dpm_solver_step import dpm_solver_pp_step, dpm_solver_step_torch
from kernels.patch.dpm_solver_scheduler import (UPDATES, diffusers_dpm_solver_pp_coefficients,
                                                patch_dpm_solver_scheduler)

OP = "dpm_solver_step"
ODD = (3, 5, 7, 9)              # 945 elements: one partially masked program
MULTI = (5, 3, 17, 29)          # 7395 elements: 8 programs, the last one ragged
# An order-3 step of the N=16 CMT grid: large coefficients of both signs that cancel (sum = 1).
COEFFS = {1: (0.829, 0.171, 0.0, 0.0), 2: (0.829, 0.52, -0.349, 0.0), 3: (0.829, 1.63, -1.12, 0.661)}


def triton():
    return dispatch.forced(OP, "triton")


def inputs(shape, order, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 3).to(dtype) for _ in range(order + 1)]


def truth(tensors, coeffs):
    return sum(c * t.double() for c, t in zip(coeffs, tensors))


@pytest.fixture
def gpu_bf16_rounding(monkeypatch):
    """Round float32 -> bfloat16 to nearest-even in the interpreter, as the GPU does.

    Compiled Triton lowers ``.to(tl.bfloat16)`` to a round-to-nearest-even conversion; triton 3.8's
    interpreter (``InterpreterBuilder.cast_impl`` -> ``_convert_float(..., rounding_mode=None)``) truncates
    instead, an interpreter artifact worth up to one bfloat16 ulp that would otherwise be charged to the kernel.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.create_fp_trunc

    def nearest_even(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", nearest_even)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_accuracy_no_worse_than_torch_in_the_same_dtype(dtype, order, gpu_bf16_rounding):
    tensors, coeffs = inputs(MULTI, order, dtype), COEFFS[order]
    with triton():
        fused = dpm_solver_pp_step(*tensors, coeffs=coeffs)
    assert dispatch.last_implementation(OP) == "triton" and fused.dtype == dtype
    exact = truth(tensors, coeffs)
    reference_error = (dpm_solver_step_torch(*tensors, coeffs=coeffs).double() - exact).abs()
    fused_error = (fused.double() - exact).abs()
    # Both round once into dtype after float32 arithmetic: per element, the error is the rounding of the
    # exact value into dtype (measured by torch) plus a few float32 roundings of the partial sums.
    storage_error = (exact.to(dtype).double() - exact).abs()
    float32_error = 2e-6 * sum(abs(c) * t.double().abs() for c, t in zip(coeffs, tensors))
    assert (fused_error <= storage_error + float32_error).all()
    assert fused_error.max() <= reference_error.max() + float32_error.max()
    assert fused_error.pow(2).mean().sqrt() <= 1.01 * reference_error.pow(2).mean().sqrt() + 1e-7


@pytest.mark.parametrize("shape", [ODD, MULTI, (1,), (2, 1, 1)])
def test_odd_sizes_match_the_reference(shape):
    tensors = inputs(shape, 3)
    with triton():
        fused = dpm_solver_pp_step(*tensors, coeffs=COEFFS[3])
    torch.testing.assert_close(fused, dpm_solver_step_torch(*tensors, coeffs=COEFFS[3]), rtol=1e-6, atol=1e-5)


def test_non_contiguous_inputs_are_read_correctly_and_their_copy_is_counted():
    x, d1, d2 = inputs((9, 7, 5, 3), 2)
    d0 = inputs((3, 5, 14, 9), 0)[0][:, :, ::2]                     # strided slice
    views = [x.permute(3, 2, 1, 0), d0, d1.permute(3, 2, 1, 0), d2.permute(3, 2, 1, 0).contiguous()]   # [3, 5, 7, 9]
    assert [v.is_contiguous() for v in views] == [False, False, False, True]
    with triton():
        fused = dpm_solver_pp_step(*views, coeffs=COEFFS[3])
        counted = count_triton(dpm_solver_pp_step, *views, coeffs=COEFFS[3])
    expected = dpm_solver_step_torch(*views, coeffs=COEFFS[3])
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-5)
    assert fused.is_contiguous()
    # x, D0 and D1 are not contiguous: three host copies (read + write each), then one fused pass.
    nbytes = tensor_bytes(fused)
    assert counted["ops"] == ["aten.clone.default"] * 3 + ["triton:_dpm_solver_step_kernel"]
    assert counted["bytes_read"] == 3 * nbytes + 4 * nbytes
    assert counted["bytes_written"] == 3 * nbytes + nbytes


@pytest.mark.parametrize("order", [1, 2, 3])
def test_counted_traffic_is_one_read_per_input_and_one_write_per_output(order):
    tensors = inputs((4, 3, 16, 16), order)
    nbytes = tensor_bytes(tensors[0])
    buffer = torch.empty(4, 5, 3, 16, 16)
    with triton():
        plain = count_triton(dpm_solver_pp_step, *tensors, coeffs=COEFFS[order])
        with_slot = count_triton(dpm_solver_pp_step, *tensors, coeffs=COEFFS[order], slot=buffer[:, 2])
    assert plain == {"launches": 1, "bytes_read": (order + 1) * nbytes, "bytes_written": nbytes,
                     "ops": ["triton:_dpm_solver_step_kernel"]}
    assert with_slot["bytes_read"] == (order + 1) * nbytes and with_slot["bytes_written"] == 2 * nbytes
    eager = count_eager(dpm_solver_step_torch, *tensors, coeffs=COEFFS[order])
    assert eager["launches"] == 2 * order + 1                       # a·x, then (b_k·D_k, +) per output
    assert eager["bytes_read"] == (3 * order + 1) * nbytes and eager["bytes_written"] == (2 * order + 1) * nbytes


def test_per_sample_coefficients_equal_one_call_per_sample():
    x, d0, d1, d2 = inputs(MULTI, 3)
    g = torch.Generator().manual_seed(4)
    coeffs = [torch.rand(MULTI[0], generator=g, dtype=torch.float64) * 2 - 0.5 for _ in range(4)]
    with triton():
        fused = dpm_solver_pp_step(x, d0, d1, d2, coeffs=coeffs)
        for b in range(MULTI[0]):
            single = dpm_solver_pp_step(x[b:b + 1], d0[b:b + 1], d1[b:b + 1], d2[b:b + 1],
                                        coeffs=[float(c[b]) for c in coeffs])
            torch.testing.assert_close(fused[b:b + 1], single, rtol=0, atol=0)
        # each program reads each coefficient once per sample it touches, not once per element
        counted = count_triton(dpm_solver_pp_step, x, d0, d1, d2, coeffs=coeffs)
    programs = -(-x.numel() // kds.launch_config()[0])
    assert 4 * tensor_bytes(x) < counted["bytes_read"] <= 4 * tensor_bytes(x) + 4 * 8 * (programs + MULTI[0])
    torch.testing.assert_close(fused, dpm_solver_step_torch(x, d0, d1, d2, coeffs=coeffs), rtol=1e-6, atol=1e-5)


def test_in_place_update_writes_into_x():
    x, d0, d1, d2 = inputs(MULTI, 3)
    expected = dpm_solver_step_torch(x, d0, d1, d2, coeffs=COEFFS[3])
    with triton():
        result = dpm_solver_pp_step(x, d0, d1, d2, coeffs=COEFFS[3], out=x)
    assert result is x
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-5)


def test_slot_store_fills_only_its_slot():
    tensors = inputs(ODD, 3, torch.bfloat16)
    buffer = torch.full((ODD[0], 4, *ODD[1:]), float("nan"), dtype=torch.bfloat16)   # [B, N, ...]
    with triton():
        result = dpm_solver_pp_step(*tensors, coeffs=COEFFS[3], slot=buffer[:, 2])
    assert torch.equal(buffer[:, 2], result)
    assert torch.isnan(buffer[:, [0, 1, 3]]).all()
    with triton(), pytest.raises(ValueError, match="slot must be contiguous within each sample"):
        mixed = torch.empty(ODD[0], 4, ODD[1], ODD[3], ODD[2]).transpose(3, 4)[:, 1]   # [3, 5, 7, 9], inner strided
        dpm_solver_pp_step(*tensors, coeffs=COEFFS[3], slot=mixed)


def test_offsets_are_int64_by_design(monkeypatch):
    """A > 2^31-element tensor does not fit this machine, so check the design instead: every pointer offset
    the kernel forms (inputs, per-sample coefficient gathers, strided slot) is an int64 value, because the
    program id is widened before it is multiplied by the block size. With int32 offsets this test fails."""
    from triton.runtime import interpreter
    import triton.language as tl

    offset_types = []
    add_pointer = interpreter.InterpreterBuilder.create_addptr

    def recording(self, ptr, offset):
        offset_types.append(offset.dtype.scalar if hasattr(offset.dtype, "scalar") else offset.dtype)
        return add_pointer(self, ptr, offset)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_addptr", recording)
    x, d0, d1, d2 = inputs(ODD, 3)
    coeffs = [torch.rand(ODD[0], dtype=torch.float64) for _ in range(4)]
    buffer = torch.empty(ODD[0], 2, *ODD[1:])
    with triton():
        dpm_solver_pp_step(x, d0, d1, d2, coeffs=coeffs, slot=buffer[:, 1])
    assert len(offset_types) == 10          # x, D0..D2, 4 coefficient gathers, out, slot
    assert set(offset_types) == {tl.int64}


def test_strided_per_sample_coefficients_are_read_by_sample():
    """Per-sample coefficients given as strided views (e.g. every other entry of a longer schedule) are read
    at their logical index, not at ``pointer + sample`` of the underlying storage."""
    x, d0, d1, d2 = inputs(MULTI, 3)
    g = torch.Generator().manual_seed(5)
    coeffs = [torch.randn(2 * MULTI[0], generator=g, dtype=torch.float64)[::2] for _ in range(4)]
    assert not coeffs[0].is_contiguous()
    coeffs[1] = torch.randn(MULTI[0], 3, generator=g, dtype=torch.float64)[:, 1]    # stride 3
    buffer = torch.zeros(MULTI[0], 2, *MULTI[1:])
    with triton():
        fused = dpm_solver_pp_step(x, d0, d1, d2, coeffs=coeffs, slot=buffer[:, 1])
    assert dispatch.last_implementation(OP) == "triton"
    expected = dpm_solver_step_torch(x, d0, d1, d2, coeffs=[c.contiguous() for c in coeffs])
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(buffer[:, 1], expected, rtol=1e-6, atol=1e-5)


def test_sample_index_is_an_int32_division_and_the_int64_path_agrees(monkeypatch, gpu_bf16_rounding):
    """The per-element sample index is an int32 division (int64 division is a long software routine on the
    GPU); only one scalar int64 division per program remains. A sample too long for int32 relative offsets
    takes the int64 path, forced here by lowering the limit, and gives the same bits."""
    from triton.runtime import interpreter
    import triton.language as tl

    divisions = []
    sdiv = interpreter.InterpreterBuilder.create_sdiv

    def recording(self, lhs, rhs):
        divisions.append((lhs.dtype.scalar if hasattr(lhs.dtype, "scalar") else lhs.dtype, lhs.data.size))
        return sdiv(self, lhs, rhs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_sdiv", recording)
    x, d0, d1, d2 = inputs(MULTI, 3, torch.bfloat16)
    coeffs = [torch.rand(MULTI[0], dtype=torch.float64) for _ in range(4)]
    buffers = [torch.full((MULTI[0], 3, *MULTI[1:]), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    block = kds.launch_config()[0]
    with triton():
        fast = dpm_solver_pp_step(x, d0, d1, d2, coeffs=coeffs, slot=buffers[0][:, 1])
        vector = {dtype for dtype, size in divisions if size == block}
        assert vector == {tl.int32} and all(size == 1 for dtype, size in divisions if dtype == tl.int64)
        divisions.clear()
        monkeypatch.setattr(kds, "_INT32_LIMIT", 0)
        wide = dpm_solver_pp_step(x, d0, d1, d2, coeffs=coeffs, slot=buffers[1][:, 1])
        assert {dtype for dtype, size in divisions if size == block} == {tl.int64}
    assert torch.equal(fast, wide) and torch.equal(buffers[0][:, 1], buffers[1][:, 1])
    assert torch.isnan(buffers[0][:, [0, 2]]).all()
    torch.testing.assert_close(fast, dpm_solver_step_torch(x, d0, d1, d2, coeffs=coeffs), rtol=0, atol=0)


def test_dispatch_is_observable_and_auto_uses_torch_on_cpu():
    tensors = inputs(ODD, 2)
    dpm_solver_pp_step(*tensors, coeffs=COEFFS[2])
    assert dispatch.last_implementation(OP) == "torch"          # auto: CPU tensors take the reference
    with triton():
        dpm_solver_pp_step(*tensors, coeffs=COEFFS[2])
    assert dispatch.last_implementation(OP) == "triton"
    with dispatch.forced(OP, "torch"):
        dpm_solver_pp_step(*tensors, coeffs=COEFFS[2])
    assert dispatch.last_implementation(OP) == "torch"


def test_forcing_triton_where_it_cannot_run_raises(monkeypatch):
    x, d0 = inputs(ODD, 1)
    with triton():
        with pytest.raises(RuntimeError, match="handles .* not torch.float64"):
            dpm_solver_pp_step(x.double(), d0.double(), coeffs=COEFFS[1])
        with pytest.raises(RuntimeError, match="no backward"):
            dpm_solver_pp_step(x.requires_grad_(), d0, coeffs=COEFFS[1])
        x = x.detach()
        with pytest.raises(ValueError, match="out must be contiguous"):
            dpm_solver_pp_step(x, d0, coeffs=COEFFS[1], out=torch.empty(ODD[::-1]).permute(3, 2, 1, 0))
        with pytest.raises(ValueError, match="out overlaps x"):
            dpm_solver_pp_step(x.flatten()[:-1], d0.flatten()[:-1], coeffs=COEFFS[1], out=x.flatten()[1:])
        with pytest.raises(ValueError, match="D2 given without D1"):
            dpm_solver_pp_step(x, d0, None, d0, coeffs=COEFFS[3])
        monkeypatch.setattr(kds, "interpreted", lambda: False)       # as if TRITON_INTERPRET were unset
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dpm_solver_pp_step(x, d0, coeffs=COEFFS[1])
    # the same float64 / requires-grad calls under auto take the reference, and it differentiates
    y = dpm_solver_pp_step(x.double().requires_grad_(), d0.double(), coeffs=COEFFS[1])
    y.sum().backward()
    assert dispatch.last_implementation(OP) == "torch"


# --------------------------------------------------------------------------------------------------
# Must-show #2: a whole CMT rollout with the fused step equals the reference rollout
# --------------------------------------------------------------------------------------------------
def conv_teacher():
    """A small deterministic EDM denoiser D = c_skip·x + c_out·F(c_in·x) with a random conv net F."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))

    def denoise(x, sigma, labels=None):
        s = sigma.view(-1, 1, 1, 1)
        return 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * net(x / (s ** 2 + 0.25).sqrt())
    return denoise


def test_cmt_rollout_with_the_fused_step_equals_the_reference():
    teacher, sigmas, shape = conv_teacher(), edm_lambda_uniform_sigmas(16), (3, 8, 8)
    reference = consistency_pairs(teacher, 2, shape, sigmas, order=3, generator=torch.Generator().manual_seed(1))
    assert dispatch.last_implementation(OP) == "torch"
    dispatch.implementations_run(reset=True)
    with triton():
        fused = consistency_pairs(teacher, 2, shape, sigmas, order=3, generator=torch.Generator().manual_seed(1))
    assert dispatch.implementations_run() == {f"{OP}:triton": 16}
    # fp32 end to end: the only difference allowed is float32 rounding order, amplified by 16 teacher steps.
    scale = reference.x.abs().max()
    torch.testing.assert_close(fused.x, reference.x, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(fused.target, reference.target, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(fused.t, reference.t) and torch.equal(fused.level, reference.level)


def test_rollout_writes_states_into_the_pair_buffer_without_stacking():
    teacher, sigmas = conv_teacher(), edm_lambda_uniform_sigmas(4)
    counted = count_eager(consistency_pairs, teacher, 2, (3, 4, 4), sigmas, order=3,
                          generator=torch.Generator().manual_seed(1))
    assert not [op for op in counted["ops"] if "stack" in op or "cat" in op]
    pairs = consistency_pairs(teacher, 2, (3, 4, 4), sigmas, order=3, generator=torch.Generator().manual_seed(1))
    assert pairs.x._base is not None and pairs.x.is_contiguous()     # a view of the buffer the solver filled


@torch.no_grad()
@pytest.mark.parametrize("slots", [5, 4])
def test_solver_fills_a_trajectory_buffer_of_all_states_or_all_but_the_end(slots):
    teacher, sigmas = conv_teacher(), edm_lambda_uniform_sigmas(4)
    x_T = 80.0 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    plain = dpm_solver_pp(teacher, x_T, sigmas)
    buffer = torch.full((2, slots, 3, 4, 4), float("nan"))                   # trajectory-major [B, K, ...]
    with triton():
        states = dpm_solver_pp(teacher, x_T, sigmas, out=buffer.transpose(0, 1))
    assert len(states) == 5 and torch.equal(buffer[:, 0], x_T)
    for i, (state, reference) in enumerate(zip(states, plain)):
        torch.testing.assert_close(state, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
        if i < slots:
            assert torch.equal(buffer[:, i], state)
    with pytest.raises(ValueError, match=r"expected \[5 or 4, 2, 3, 4, 4\]"):
        dpm_solver_pp(teacher, x_T, sigmas, out=buffer[:, :3].transpose(0, 1))


# --------------------------------------------------------------------------------------------------
# diffusers: the scheduler patched by kernels/patch/dpm_solver_scheduler.py samples like the unpatched one
# --------------------------------------------------------------------------------------------------
def model(x, t):
    return torch.tanh(0.3 * x) * 0.7 + 0.001 * float(t)


def sample(scheduler, x, steps=6):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


SCHEDULER_CASES = {
    "dpm_midpoint": (DPMSolverMultistepScheduler, {}),
    "dpm_heun_karras": (DPMSolverMultistepScheduler, {"solver_type": "heun", "use_karras_sigmas": True}),
    "dpm_flow": (DPMSolverMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "edm": (EDMDPMSolverMultistepScheduler, {}),
}


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("case", SCHEDULER_CASES)
def test_patched_scheduler_samples_like_diffusers_and_reverts(case, order):
    cls, config = SCHEDULER_CASES[case]
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(order)) * cls(**config).init_noise_sigma
    expected = sample(cls(solver_order=order, **config), x_T)
    scheduler = cls(solver_order=order, **config)
    with triton(), patch_dpm_solver_scheduler(scheduler) as handle:
        got = sample(scheduler, x_T)
        assert dispatch.last_implementation(OP) == "triton"
    assert handle.calls == {"fused": 6}
    # float32 rounding only: diffusers forms its coefficients in float32, the patch in float64
    assert (got - expected).norm() <= 2e-6 * expected.norm()
    for name in ("dpm_solver_first_order_update", "multistep_dpm_solver_third_order_update"):
        assert getattr(scheduler, name).__func__ is getattr(cls, name)
    torch.testing.assert_close(sample(scheduler, x_T), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", SCHEDULER_CASES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_expansion_is_diffusers_formula_in_float64(case, order):
    """Called on float64 sigmas and tensors, diffusers' own update and the expanded one agree to 1e-12."""
    cls, config = SCHEDULER_CASES[case]
    scheduler = cls(solver_order=3, **config)
    scheduler.set_timesteps(8)
    scheduler.sigmas = scheduler.sigmas.double()
    scheduler._step_index = 4
    g = torch.Generator().manual_seed(order)
    x, *outputs = torch.randn(4, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    name = list(UPDATES)[order - 1]
    first = outputs[0] if order == 1 else outputs[:order][::-1]            # diffusers: newest last
    expected = getattr(cls, name)(scheduler, first, sample=x)
    alpha, sigma = zip(*[scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[5 - k]) for k in range(order + 1)])
    lambdas = [torch.log(torch.as_tensor(a, dtype=torch.float64)) - torch.log(s) for a, s in zip(alpha, sigma)]
    coeffs = diffusers_dpm_solver_pp_coefficients(lambdas, alpha[0], sigma[0], sigma[1], order=order,
                                                  solver_type=scheduler.config.solver_type)
    got = dpm_solver_pp_step(x, *outputs[:order], coeffs=coeffs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [{"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
                                    {"algorithm_type": "sde-dpmsolver++"}])
def test_uncovered_configurations_fall_back_to_diffusers(config):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    scheduler = DPMSolverMultistepScheduler(solver_order=3, **config)
    torch.manual_seed(0)
    expected = sample(DPMSolverMultistepScheduler(solver_order=3, **config), x_T)
    with patch_dpm_solver_scheduler(scheduler) as handle:
        torch.manual_seed(0)
        got = sample(scheduler, x_T)
    assert handle.calls == {"original": 6}
    assert torch.equal(got, expected)


def test_patching_refuses_what_it_does_not_reproduce():
    class Custom(DPMSolverMultistepScheduler):
        def multistep_dpm_solver_third_order_update(self, *args, **kwargs):
            return super().multistep_dpm_solver_third_order_update(*args, **kwargs)

    with pytest.raises(TypeError, match="overrides multistep_dpm_solver_third_order_update"):
        patch_dpm_solver_scheduler(Custom())
    scheduler = DPMSolverMultistepScheduler()
    with patch_dpm_solver_scheduler(scheduler):
        with pytest.raises(RuntimeError, match="patched twice"):
            patch_dpm_solver_scheduler(scheduler)
