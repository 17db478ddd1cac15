"""`make gpu-check`: every kernel test on CUDA, then the kernels' speed against the device's peak, in ≤ 8 min.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu] [--quick]

Why: nothing in kernels/ is tested on a GPU by `make test` (its Triton kernels run in the CPU interpreter
there), so one command on one H100/H200 has to say whether the compiled kernels are right and how fast they
are. Sections run in order, each within its own time budget (:data:`FULL`; ``--quick`` is a ~2-minute
subset, :data:`QUICK`), and each measurement's failure is caught and recorded, so one failure does not lose
the others:

1. ``tests``: ``pytest -m gpu tests/kernels/test_gpu_kernels.py`` in a fresh process with TRITON_INTERPRET=0
   (tests/conftest.py would otherwise turn the interpreter on): the compiled kernels at realistic shapes,
   every error against float64 within :func:`check_error`'s rule.
2. ``dpm_step``: the fused DPM-Solver++ step against the eager reference, orders 1–3, bf16/fp16/fp32, on the
   SD-latent batch of ``benchmarks.kernel_dpm_solver_step`` and on a large batch whose inputs exceed the L2
   cache. Bytes: the fused kernel moves :func:`fused_step_bytes` (order + 1 reads, one write: the count
   ``benchmarks.kernel_dpm_solver_step`` measures in the interpreter; tests/benchmarks/test_gpu_check.py
   checks the two agree); the eager reference's bytes are counted on the device by
   ``benchmarks.counting.count_eager``. Timer: ``triton.testing.do_bench`` (CUDA events, L2 flushed before
   every call, median).
3. ``attention``: for head dims 64/72/128, N 256/1024/4096, bf16/fp16/fp32 (16 heads, B·N = 16k tokens):
   forward+tangent of ``jvp_attention`` under ``torch.func.jvp``, of the fused ``attention_jvp``, and of SDPA's
   math backend under ``torch.func.jvp``; the forward of ``jvp_attention`` and of SDPA flash (the
   memory-efficient backend for fp32, which flash does not take). FLOPs are the useful work, the same for
   every implementation: forward 4·B·H·N²·d (q·kᵀ and P·v), forward+tangent 12·B·H·N²·d (adding dq·kᵀ,
   q·dkᵀ, (P⊙(dS−μ))·v and P·dv); softmax and exp are not counted, nor the q·kᵀ the autograd path
   recomputes.
   Timer: ``triton.testing.do_bench_cudagraph`` (CUDA graph replay, so no host overhead; median), plain
   ``do_bench`` where a graph cannot be captured (the row's ``timer`` says which).

Then it prints the three goals kernels/README.md sets (:func:`judge_goals`: PASS / MISS and the measured ratio) and writes
``<out>/<device-slug>.csv`` (one row per measurement) and ``.md``. Peaks come from :data:`PEAKS` by device
name; on another device it says "peak unknown" and reports absolute numbers only. Exit status 1 if a test
failed (or none passed), a section crashed or a measurement raised; 0 otherwise, goals met or not.
Without CUDA it says so in one line, writes nothing and exits 0. For tests only, the hidden
``--interpret-smoke`` runs sections 2 and 3 on tiny CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)
with a CPU timer, judges no goal and refuses to write under benchmarks/results.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEST_FILE = ROOT / "tests" / "kernels" / "test_gpu_kernels.py"
FACTOR = 2.0   # a kernel's error against float64 is at most twice PyTorch's own (plus a floor)
FIELDS = ["section", "name", "impl", "dtype", "shape", "order", "head_dim", "seq_len", "ms", "bytes", "gb_s",
          "pct_hbm", "flops", "tflop_s", "pct_peak_flops", "value", "timer", "status", "detail"]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------------
# The tolerance rule (used by tests/kernels/test_gpu_kernels.py)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorStats:
    """|value − truth| of one output in float64 (its max and sum of squares) with the truth's own size; two
    stats of disjoint chunks add up, so tensors of more than 2^31 elements are measured chunk by chunk."""
    max_abs: float
    sum_sq: float
    truth_max: float
    truth_sum_sq: float
    count: int

    @classmethod
    def of(cls, value: torch.Tensor, truth: torch.Tensor, chunk: int = 2**26) -> ErrorStats:
        if value.shape != truth.shape:
            raise ValueError(f"value {tuple(value.shape)} and truth {tuple(truth.shape)} differ in shape")
        value, truth = value.reshape(-1), truth.reshape(-1)
        total = cls(0.0, 0.0, 0.0, 0.0, 0)
        for start in range(0, value.numel(), chunk):
            t = truth[start:start + chunk].double()
            e = value[start:start + chunk].double() - t
            total += cls(e.abs().max().item(), e.square().sum().item(), t.abs().max().item(),
                         t.square().sum().item(), e.numel())
        return total

    def __add__(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(max(self.max_abs, other.max_abs), self.sum_sq + other.sum_sq,
                          max(self.truth_max, other.truth_max), self.truth_sum_sq + other.truth_sum_sq,
                          self.count + other.count)

    def metrics(self) -> dict[str, tuple[float, float]]:
        """{metric: (error, the truth's size in that metric)}: the max catches a few wrong elements (a tail
        block, one bad stride), the RMS the typical error."""
        n = max(self.count, 1)
        return {"max": (self.max_abs, self.truth_max),
                "rms": (math.sqrt(self.sum_sq / n), math.sqrt(self.truth_sum_sq / n))}

    def carried_to(self, other: ErrorStats) -> ErrorStats:
        """This error at the same relative size on ``other``'s truth: how accurate a PyTorch op that cannot
        compute ``other``'s output (fused SDPA has no tangent) would be on it."""
        m = self.metrics()
        rel = {k: (err / size if size else 0.0) for k, (err, size) in m.items()}
        o = other.metrics()
        return ErrorStats(rel["max"] * o["max"][1], (rel["rms"] * o["rms"][1]) ** 2 * other.count,
                          other.truth_max, other.truth_sum_sq, other.count)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def check_error(kernel: ErrorStats, torch_own: ErrorStats | Sequence[ErrorStats], dtype: torch.dtype,
                floor_ulps: float = 1.0) -> tuple[float, str | None]:
    """The rule: for the max and the RMS error against float64 alike,
    error(kernel) ≤ FACTOR × error(PyTorch's own op in ``dtype``) + floor_ulps × eps(dtype) × |truth|.

    ``torch_own`` may list several PyTorch implementations; the least accurate one counts (PyTorch offers
    each). The floor is what no implementation in ``dtype`` can beat by much: rounding the float64 truth into
    ``dtype`` alone costs up to eps/2 of it, so with the default one ulp a kernel is never asked to be more
    exact than its own output format when PyTorch happens to round exactly; callers raise it only where they
    say why. Returns (use, failure): use = the larger of error / bound over the metrics (≤ 1 passes), failure
    a readable line or None.
    """
    owns = [torch_own] if isinstance(torch_own, ErrorStats) else list(torch_own)
    use, failures = 0.0, []
    for metric, (err, size) in kernel.metrics().items():
        theirs = max(own.metrics()[metric][0] for own in owns)
        floor = floor_ulps * eps(dtype) * size
        bound = FACTOR * theirs + floor
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
        use = max(use, ratio)
        if ratio > 1:
            failures.append(f"{metric} error {err:.3g} > {FACTOR:g} × PyTorch's {theirs:.3g} + floor {floor:.3g} "
                            f"({floor_ulps:g} ulp of {size:.3g})")
    return use, "; ".join(failures) or None


# --------------------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peak:
    """Vendor datasheet peaks: HBM bandwidth and dense bf16 (= fp16) tensor-core throughput."""
    label: str
    hbm_tb_s: float
    tflops_16bit: float


# (all of these in the upper-cased device name, none of these, peak); first match wins
PEAKS: list[tuple[tuple[str, ...], tuple[str, ...], Peak]] = [
    (("H200",), ("NVL",), Peak("H200 SXM", 4.8, 989.0)),
    (("H100", "PCIE"), (), Peak("H100 PCIe", 2.0, 756.0)),
    (("H100", "SXM"), (), Peak("H100 SXM", 3.35, 989.0)),
    (("H100", "HBM3"), ("NVL", "PCIE"), Peak("H100 SXM", 3.35, 989.0)),   # "NVIDIA H100 80GB HBM3" is the SXM part
    (("A100", "SXM", "80GB"), (), Peak("A100 80GB SXM", 2.039, 312.0)),
]


def peak_for(device_name: str) -> Peak | None:
    """The peak of a device named like torch.cuda.get_device_name(), or None ("peak unknown")."""
    name = device_name.upper()
    for needs, excludes, peak in PEAKS:
        if all(s in name for s in needs) and not any(s in name for s in excludes):
            return peak
    return None


def device_slug(device_name: str) -> str:
    """A file name for the device: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown-device"


def fused_step_bytes(order: int, x: torch.Tensor) -> int:
    """Global-memory bytes of one fused DPM step: order + 1 inputs read once, x_next written once."""
    return (order + 2) * x.numel() * x.element_size()


# --------------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    name: str
    test_filter: str | None                               # pytest -k; None: every test
    dpm_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    dpm_dtypes: tuple[torch.dtype, ...]
    attention_cases: tuple[tuple[torch.dtype, int, int], ...]  # (dtype, head dim, N), goal case first
    budgets: dict = field(default_factory=dict)              # section -> seconds
    heads: int = 16
    tokens: int = 16384                                       # B = tokens // N
    goal_dpm_shape: str = "large"
    goal_attention: tuple[torch.dtype, int, int] = (torch.bfloat16, 64, 1024)

    def batch(self, n: int) -> int:
        return max(1, self.tokens // n)


SD_LATENT = (64, 4, 64, 64)          # benchmarks.kernel_dpm_solver_step.SHAPE: fits in L2 (2–4 MB per tensor)
LARGE = (128, 16, 128, 128)          # 33.5M elements: 67–134 MB per tensor, every order's inputs exceed L2
ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ATTENTION_ALL = tuple((dt, d, n) for dt in ALL_DTYPES for d in (64, 72, 128) for n in (1024, 256, 4096))
# Seconds per section, so that the whole run stays under 8 minutes on an H100: the tests compile every
# kernel variant (~110 Triton compiles, most of their time on a cold cache; the timings then reuse them);
# a timing takes ~0.3 s. A section stops starting measurements when its budget is spent.
FULL = Plan("full", None, (("sd-latent", SD_LATENT), ("large", LARGE)), ALL_DTYPES, _ATTENTION_ALL,
            budgets={"tests": 300, "dpm_step": 35, "attention": 110})
QUICK = Plan("quick", "bf16", (("large", LARGE),), (torch.bfloat16,),
             ((torch.bfloat16, 64, 1024), (torch.bfloat16, 64, 4096), (torch.bfloat16, 128, 1024),
              (torch.bfloat16, 72, 256)),
             budgets={"tests": 90, "dpm_step": 10, "attention": 20})
# Tests only: the timing code end to end on tiny CPU tensors in the interpreter (never GPU numbers).
SMOKE = Plan("interpreter-smoke", None, (("tiny", (2, 3, 5, 7)),), (torch.float32, torch.bfloat16),
             ((torch.float32, 16, 32), (torch.bfloat16, 16, 24)),
             budgets={"dpm_step": 120, "attention": 240}, heads=2, tokens=32, goal_dpm_shape="tiny",
             goal_attention=(torch.float32, 16, 32))


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def time_events(fn: Callable) -> tuple[float, str]:
    """Median ms by CUDA events, the L2 cache flushed before every call (what a memory-bound op needs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"), "cuda-events"


def time_graph(fn: Callable) -> tuple[float, str]:
    """Median ms of a CUDA graph of back-to-back calls (no host overhead: the GPU's time for torch.func.jvp's
    many launches); CUDA events per call where a graph cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median"), "cuda-graph"
    except Exception as error:   # capture refused (an op that syncs, a library without graph support)
        torch.cuda.synchronize()
        ms, _ = time_events(fn)
        return ms, f"cuda-events (no graph: {type(error).__name__})"


def time_cpu(fn: Callable, reps: int = 2) -> tuple[float, str]:
    """Median ms by perf_counter after one warm-up call (the interpreter smoke run only)."""
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), "cpu-perf-counter"


def _sig(x: float) -> float:
    """Four significant digits: what a timing supports."""
    return float(f"{x:.4g}")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


@dataclass
class Run:
    """One run's settings and what it measured so far."""
    plan: Plan
    device: torch.device
    peak: Peak | None
    smoke: bool
    rows: list = field(default_factory=list)
    crashed: list = field(default_factory=list)      # sections that raised
    seconds: dict = field(default_factory=dict)      # section -> wall seconds

    def timer(self, kind: str) -> Callable:
        return time_cpu if self.smoke else {"events": time_events, "graph": time_graph}[kind]

    def measure(self, row: dict, fn: Callable, timer: Callable, nbytes=None, flops: int | None = None) -> None:
        """Time ``fn``, add rates against the peak, record the row (status error with the reason if anything
        raises). ``nbytes`` may be a callable, counted only after the timing worked."""
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            ms, label = timer(fn)
            row.update(ms=_sig(ms), timer=label, status="ok")
            nbytes = nbytes() if callable(nbytes) else nbytes
            if nbytes:
                gb_s = nbytes / ms / 1e6
                row.update(bytes=nbytes, gb_s=_sig(gb_s))
                if self.peak:
                    row["pct_hbm"] = round(100 * gb_s / (self.peak.hbm_tb_s * 1e3), 1)
            if flops:
                tflop_s = flops / ms / 1e9
                row.update(flops=flops, tflop_s=_sig(tflop_s))
                if self.peak and row.get("dtype") in ("bf16", "fp16"):
                    row["pct_peak_flops"] = round(100 * tflop_s / self.peak.tflops_16bit, 1)
        except Exception as error:
            row.update(status="error", detail=_first_line(error))
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        self.rows.append(row)
        print(progress_line(row), flush=True)

    def case(self, rows: list[dict], section: str, deadline: float, body: Callable) -> None:
        """Run one case's ``body`` (which measures ``rows``) unless the section's budget is spent; rows the
        body never reached (an allocation that failed, say) are recorded with the error."""
        if time.monotonic() > deadline:
            for row in rows:
                row.update(status="skipped", detail=f"the {section} budget of {self.plan.budgets[section]} s was spent")
            self.rows += rows
            return
        try:
            body()
        except Exception as error:
            for row in rows:
                if "status" not in row:
                    row.update(status="error", detail=_first_line(error))
                    self.rows.append(row)
        finally:
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()


def progress_line(row: dict) -> str:
    what = " ".join(str(row[k]) for k in ("section", "name", "impl", "dtype", "shape") if row.get(k))
    if row.get("order"):
        what += f" order {row['order']}"
    if row.get("status") != "ok":
        return f"  {what}: {row.get('status')} {row.get('detail', '')}"
    rates = [f"{row['ms']:.4g} ms"]
    if row.get("gb_s") is not None:
        rates.append(f"{row['gb_s']:.0f} GB/s" + (f" ({row['pct_hbm']}% of HBM)" if row.get("pct_hbm") else ""))
    if row.get("tflop_s") is not None:
        rates.append(f"{row['tflop_s']:.1f} TFLOP/s"
                     + (f" ({row['pct_peak_flops']}% of peak)" if row.get("pct_peak_flops") else ""))
    return f"  {what}: " + ", ".join(rates)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def run_tests(run: Run, budget: float) -> None:
    """The CUDA tests in a fresh process; one row per test case from its JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-o",
               "junit_family=legacy", f"--junitxml={junit}", str(TEST_FILE)]
        if run.plan.test_filter:
            cmd += ["-k", run.plan.test_filter]
        # "0", not unset: tests/conftest.py switches the interpreter on when the variable is absent.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        print(f"gpu-check: tests: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        cases = parse_junit(junit) if junit.is_file() else []
    run.rows += cases
    if rc is None or rc not in (0, 1) or not cases:
        reason = (f"did not finish within the tests budget of {budget:.0f} s" if rc is None
                  else f"pytest exited with status {rc}")
        run.rows.append(dict(section="test", name="pytest run", status="error", detail=reason))


def parse_junit(path: Path) -> list[dict]:
    """Test rows from a JUnit XML report: outcome, seconds, and the largest error/bound a test recorded
    (``record_property`` values from check_error; ≤ 1 is within the rule)."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, detail = "passed", ""
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                status = outcome
                detail = ((node.get("message") or node.text or "").strip().splitlines() or [""])[0][:300]
                break
        uses = {}
        for prop in case.iter("property"):
            with contextlib.suppress(TypeError, ValueError):
                uses[prop.get("name")] = float(prop.get("value"))
        row = dict(section="test", name=case.get("name"), status=status, detail=detail,
                   ms=round(float(case.get("time") or 0) * 1e3, 1))
        if uses:
            worst = max(uses, key=uses.get)
            row["value"] = round(uses[worst], 3)
            row["detail"] = detail or f"worst error/bound {uses[worst]:.3f} ({worst})"
        rows.append(row)
    return rows


def dpm_section(run: Run, deadline: float) -> None:
    """Fused step vs eager reference, per shape, dtype and order."""
    timer = run.timer("events")
    for label, shape in run.plan.dpm_shapes:
        for dtype in run.plan.dpm_dtypes:
            for order in (1, 2, 3):
                rows = [{"section": "dpm_step", "name": label, "impl": impl, "dtype": DTYPE_NAMES[dtype],
                         "shape": "x".join(map(str, shape)), "order": order} for impl in ("fused", "eager")]
                case = functools.partial(_dpm_case, run, rows, timer, shape, dtype, order)
                run.case(rows, "dpm_step", deadline, case)


def _dpm_case(run: Run, rows: list[dict], timer: Callable, shape, dtype, order: int) -> None:
    from benchmarks.counting import count_eager
    from benchmarks.kernel_dpm_solver_step import COEFFS
    from kernels import dispatch
    from kernels.dpm_solver_step import dpm_solver_pp_step, dpm_solver_step_torch

    tensors = [torch.randn(shape, device=run.device, dtype=dtype) for _ in range(order + 1)]
    coeffs = COEFFS[order]

    def fused():
        with dispatch.forced("dpm_solver_step", "triton"):
            return dpm_solver_pp_step(*tensors, coeffs=coeffs)

    def eager():
        return dpm_solver_step_torch(*tensors, coeffs=coeffs)

    def eager_bytes():
        counted = count_eager(eager)
        return counted["bytes_read"] + counted["bytes_written"]

    run.measure(rows[0], fused, timer, nbytes=fused_step_bytes(order, tensors[0]))
    run.measure(rows[1], eager, timer, nbytes=eager_bytes)
    if rows[0]["status"] == rows[1]["status"] == "ok":
        rows[1]["detail"] = f"fused is {rows[1]['ms'] / rows[0]['ms']:.2f}x faster"


def sdpa_backends(dtype: torch.dtype, device: torch.device):
    """(label, backends) of the fused SDPA forward compared with: flash for 16-bit, memory-efficient for fp32
    (flash does not take it); on CPU (smoke run) SDPA's own choice."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return "sdpa", None
    if dtype == torch.float32:
        return "sdpa-efficient", [SDPBackend.EFFICIENT_ATTENTION]
    return "sdpa-flash", [SDPBackend.FLASH_ATTENTION]


def math_attention(q, k, v):
    """SDPA's math backend called directly (what PyTorch runs under forward-mode AD)."""
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v)[0]


def attention_section(run: Run, deadline: float) -> None:
    """Forward+tangent and forward per (dtype, head dim, N), each implementation on the same inputs."""
    timer = run.timer("graph")
    for dtype, d, n in run.plan.attention_cases:
        shape = (run.plan.batch(n), run.plan.heads, n, d)
        label, backends = sdpa_backends(dtype, run.device)
        base = {"dtype": DTYPE_NAMES[dtype], "shape": "x".join(map(str, shape)), "head_dim": d, "seq_len": n}
        rows = [{"section": "attention_jvp", "impl": impl, **base}
                for impl in ("jvp_attention", "attention_jvp", "math")]
        rows += [{"section": "attention_forward", "impl": impl, **base} for impl in ("jvp_attention", label)]
        case = functools.partial(_attention_case, run, rows, timer, shape, dtype, backends)
        run.case(rows, "attention", deadline, case)


def _attention_case(run: Run, rows: list[dict], timer: Callable, shape, dtype, backends) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from kernels import dispatch
    from kernels.attention import attention_jvp, jvp_attention

    q, k, v, tq, tk, tv = (torch.randn(shape, device=run.device, dtype=dtype) for _ in range(6))
    forward_flops = 4 * math.prod(shape) * shape[2]      # 4·B·H·N²·d

    def triton_jvp():
        with dispatch.forced("attention", "triton"):
            return torch.func.jvp(jvp_attention, (q, k, v), (tq, tk, tv))

    def fused_jvp():
        return attention_jvp(q, k, v, tq, tk, tv)

    def math_jvp():
        return torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))

    def triton_forward():
        with dispatch.forced("attention", "triton"):
            return jvp_attention(q, k, v)

    def sdpa_forward():
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v)

    for row, fn in zip(rows[:3], (triton_jvp, fused_jvp, math_jvp), strict=True):
        run.measure(row, fn, timer, flops=3 * forward_flops)
    for row, fn in zip(rows[3:], (triton_forward, sdpa_forward), strict=True):
        run.measure(row, fn, timer, flops=forward_flops)
    jvp, _, math_row = rows[:3]
    if jvp["status"] == math_row["status"] == "ok":
        math_row["detail"] = f"jvp_attention is {math_row['ms'] / jvp['ms']:.2f}x faster"


# --------------------------------------------------------------------------------------------------
# Goals
# --------------------------------------------------------------------------------------------------
def _find(rows, **want) -> dict | None:
    for row in rows:
        if row.get("status") == "ok" and all(row.get(k) == v for k, v in want.items()):
            return row
    return None


def judge_goals(rows: list[dict], plan: Plan, peak: Peak | None, smoke: bool) -> list[dict]:
    """The goals (kernels/README.md) from the measured rows, as goal rows: status PASS / MISS, or why not judged."""
    dtype, d, n = plan.goal_attention
    at = f"{DTYPE_NAMES[dtype]}, d={d}, N={n}"
    key = dict(dtype=DTYPE_NAMES[dtype], head_dim=d, seq_len=n)
    goals = []

    def goal(name, value, passed, detail, unjudged=None):
        status = unjudged or ("not measured" if value is None else ("PASS" if passed else "MISS"))
        goals.append(dict(section="goal", name=name, value=None if value is None else round(value, 3),
                          status=status, detail=detail or ""))

    smoke_note = "not judged (interpreter smoke run)" if smoke else None
    dpm = [r for r in rows if r.get("section") == "dpm_step" and r.get("impl") == "fused"
           and r.get("name") == plan.goal_dpm_shape and r.get("status") == "ok"]
    dtypes = "/".join(DTYPE_NAMES[dt] for dt in plan.dpm_dtypes)
    name = f"DPM step at >= 80% of HBM bandwidth ({plan.goal_dpm_shape} batch, orders 1-3, {dtypes}: the worst)"
    if dpm and peak is None:
        goal(name, None, False, f"slowest {min(r['gb_s'] for r in dpm):.0f} GB/s", smoke_note or "peak unknown")
    else:
        worst = min((r["pct_hbm"] for r in dpm), default=None)
        goal(name, worst, worst is not None and worst >= 80,
             worst is not None and f"{worst:.1f}% of {peak.hbm_tb_s} TB/s, the worst of {len(dpm)}", smoke_note)

    jvp = _find(rows, section="attention_jvp", impl="jvp_attention", **key)
    math_row = _find(rows, section="attention_jvp", impl="math", **key)
    speedup = math_row["ms"] / jvp["ms"] if jvp and math_row else None
    goal(f"jvp_attention forward+tangent >= 3x faster than math under jvp ({at})", speedup,
         speedup is not None and speedup >= 3, speedup is not None and f"{speedup:.2f}x", smoke_note)

    sdpa = next((r for r in rows if r.get("section") == "attention_forward" and r.get("status") == "ok"
                 and str(r.get("impl")).startswith("sdpa") and all(r.get(k) == v for k, v in key.items())), None)
    per_flop = sdpa["tflop_s"] / jvp["tflop_s"] if jvp and sdpa else None
    goal(f"jvp_attention forward+tangent within 1.5x of SDPA flash forward per FLOP ({at})", per_flop,
         per_flop is not None and per_flop <= 1.5,
         per_flop is not None and f"SDPA {sdpa['tflop_s']:.1f} / jvp_attention {jvp['tflop_s']:.1f} TFLOP/s "
                                  f"= {per_flop:.2f}x", smoke_note)
    return goals


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def write_results(out: Path, slug: str, rows: list[dict], info: dict) -> tuple[Path, Path]:
    """<out>/<slug>.csv (one row per measurement, FIELDS) and <out>/<slug>.md (markdown(rows, info))."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{slug}.csv", out / f"{slug}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown(rows, info))
    return csv_path, md_path


def _cell(value, fmt="{}") -> str:
    return "—" if value is None or value == "" else fmt.format(value)


def markdown(rows: list[dict], info: dict) -> str:
    """The readable page: device, versions, goals, test outcomes, one table per timed section, and what was
    not measured."""
    def of(section):
        return [r for r in rows if r.get("section") == section]

    peak = info.get("peak")
    lines = [f"# GPU check: {info['device']}", "",
             (f"{info['date']}; `python -m benchmarks.gpu_check` ({info['mode']}), {info['seconds']:.0f} s. "
              f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}. {info.get('hardware', '')}"), "",
             (f"Peak: {peak.label}, {peak.hbm_tb_s} TB/s HBM, {peak.tflops_16bit:g} dense bf16/fp16 TFLOP/s "
              "(datasheet)." if peak else "Peak unknown for this device: absolute numbers only."), ""]
    if info.get("smoke"):
        lines += ["**Interpreter smoke run on CPU: these are not GPU numbers, only proof that the code runs.**", ""]
    lines += ["## Goals", "", "| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {g['name']} | {_cell(g.get('detail'))} | {g['status']} |" for g in of("goal")]
    lines += _tests_md(of("test")) + _dpm_md(of("dpm_step"))
    lines += _attention_md(of("attention_jvp"), "Attention forward+tangent (12·B·H·N²·d FLOPs)",
                           "jvp_attention: torch.func.jvp through the autograd.Function (primal pass, then the "
                           "tangent pass); attention_jvp: the one fused pass; math: SDPA's math backend under "
                           "torch.func.jvp. FLOPs are the useful work, the same for all three.")
    lines += _attention_md(of("attention_forward"), "Attention forward (4·B·H·N²·d FLOPs)",
                           "jvp_attention's plain forward against SDPA flash (memory-efficient for fp32).")
    problems = [r for r in rows if r.get("status") in ("error", "skipped") and r.get("section") != "test"]
    problems += [r for r in of("test") if r["name"] == "pytest run"]
    if problems or info.get("crashed"):
        lines += ["", "## Not measured", ""]
        lines += [f"- section {name} crashed: {why}" for name, why in info.get("crashed", [])]
        lines += [f"- {progress_line(r).strip()}" for r in problems]
    return "\n".join(lines) + "\n"


TIMERS = {"cuda-events": "CUDA events per call, L2 flushed before each, median",
          "cuda-graph": "CUDA-graph replay of back-to-back calls, median",
          "cpu-perf-counter": "CPU perf_counter, median (interpreter smoke run)"}


def _timer_note(part: list[dict]) -> str:
    used = dict.fromkeys(str(r["timer"]).split(" ")[0] for r in part if r.get("timer"))
    return "Timer: " + "; ".join(TIMERS.get(t, t) for t in used) + "." if used else ""


def _tests_md(tests: list[dict]) -> list[str]:
    if not tests:
        return []
    counts = {s: sum(r["status"] == s for r in tests) for s in ("passed", "failed", "error", "skipped")}
    lines = ["", "## Correctness on CUDA (`pytest -m gpu tests/kernels/test_gpu_kernels.py`)", "",
             ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f". Rule: error against float64 ≤ {FACTOR:g} × "
             "PyTorch's own in that dtype + a floor, on the max and the RMS error (benchmarks.gpu_check.check_error); "
             "error/bound ≤ 1 passes.", "",
             "| test | outcome | s | worst error/bound | detail |", "|---|---|---:|---:|---|"]
    return lines + [f"| `{r['name']}` | {r['status']} | {_cell(r.get('ms') and r['ms'] / 1e3, '{:.1f}')} | "
                    f"{_cell(r.get('value'), '{:.3f}')} | {_cell(r.get('detail'))} |" for r in tests]


def _dpm_md(dpm: list[dict]) -> list[str]:
    if not dpm:
        return []
    lines = ["", "## Fused DPM-Solver++ step vs eager (one step, scalar coefficients)", "",
             ("Bytes: fused = (order + 2) tensors (each input read once, x_next written once); eager = its aten "
              f"ops' traffic counted on the device (benchmarks.counting). {_timer_note(dpm)}"), "",
             "| shape | dtype | order | fused ms | fused GB/s | % HBM | eager ms | eager GB/s | fused speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["shape"], r["dtype"], r["order"], r["impl"]): r for r in dpm}
    for shape, dtype, order in dict.fromkeys(key[:3] for key in by_key):
        f, e = by_key.get((shape, dtype, order, "fused"), {}), by_key.get((shape, dtype, order, "eager"), {})
        speed = e["ms"] / f["ms"] if f.get("status") == e.get("status") == "ok" else None
        lines.append(f"| {shape} | {dtype} | {order} | {_ms(f)} | {_cell(f.get('gb_s'), '{:.0f}')} | "
                     f"{_cell(f.get('pct_hbm'), '{:.1f}')} | {_ms(e)} | {_cell(e.get('gb_s'), '{:.0f}')} | "
                     f"{_cell(speed, '{:.2f}x')} |")
    return lines


def _attention_md(part: list[dict], title: str, note: str) -> list[str]:
    """One row per (dtype, shape), ms and TFLOP/s (% of the 16-bit peak) per implementation; SDPA's backends
    share a column."""
    if not part:
        return []
    def column(impl):
        return "sdpa" if impl.startswith("sdpa") else impl

    impls = list(dict.fromkeys(column(r["impl"]) for r in part))
    lines = ["", f"## {title}", "", f"{note} {_timer_note(part)} In parentheses: % of the bf16/fp16 peak.", "",
             "| dtype | B×H×N×d | " + " | ".join(f"{i} ms | {i} TFLOP/s" for i in impls) + " |",
             "|---|---|" + "---:|" * (2 * len(impls))]
    by_key = {(r["dtype"], r["shape"], column(r["impl"])): r for r in part}
    for dtype, shape in dict.fromkeys(key[:2] for key in by_key):
        cells = []
        for impl in impls:
            r = by_key.get((dtype, shape, impl), {})
            pct = f" ({r['pct_peak_flops']}%)" if r.get("pct_peak_flops") else ""
            cells += [_ms(r), _cell(r.get("tflop_s"), "{:.1f}") + pct]
        lines.append(f"| {dtype} | {shape} | " + " | ".join(cells) + " |")
    return lines


def _ms(row: dict) -> str:
    if not row:
        return "—"
    return f"{row['ms']:.4g}" if row.get("status") == "ok" else row.get("status", "—")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def _versions(device_name: str, smoke: bool) -> dict:
    import triton

    info = dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda or "none",
                date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), smoke=smoke)
    if not smoke:
        p = torch.cuda.get_device_properties(0)
        info["hardware"] = (f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                            f"compute capability {p.major}.{p.minor}.")
    return info


def _section(run: Run, name: str, fn: Callable, *args) -> None:
    start = time.monotonic()
    try:
        fn(run, *args)
    except Exception as error:    # a section's crash must not lose the others' measurements
        run.crashed.append((name, _first_line(error)))
        print(f"gpu-check: section {name} crashed: {_first_line(error)}", flush=True)
    run.seconds[name] = round(time.monotonic() - start, 1)


def _start(args) -> tuple[Run, str] | int:
    """(the run, the device's name) for these arguments, or the exit status when there is nothing to run."""
    import kernels.attention as ja
    import kernels.dpm_solver_step as kds

    interpreted = ja.INTERPRETED or kds.interpreted()
    if args.interpret_smoke:
        if not interpreted:
            print("gpu-check: --interpret-smoke needs TRITON_INTERPRET=1 set before the kernels are imported")
            return 2
        if args.out is not None and args.out.resolve().is_relative_to(RESULTS.resolve()):
            print(f"gpu-check: --interpret-smoke never writes under {RESULTS}: its numbers are not GPU numbers")
            return 2
        return Run(SMOKE, torch.device("cpu"), None, smoke=True), "CPU (Triton interpreter smoke run)"
    if interpreted:
        print("gpu-check: the kernels were defined under TRITON_INTERPRET=1 in this process; run "
              "`python -m benchmarks.gpu_check` in a fresh process without it")
        return 2
    name = torch.cuda.get_device_name(0)
    return Run(QUICK if args.quick else FULL, torch.device("cuda", 0), peak_for(name), smoke=False), name


def _exit_status(run: Run) -> int:
    """1 if a test failed or none passed (a real run), a measurement raised or a section crashed; else 0."""
    tests = [r for r in run.rows if r.get("section") == "test"]
    failed = [r["name"] for r in tests if r["status"] in ("failed", "error")]
    errors = [r for r in run.rows if r.get("status") == "error" and r.get("section") != "test"]
    unverified = not run.smoke and not any(r["status"] == "passed" for r in tests)
    if failed:
        print(f"gpu-check: FAILED tests: {', '.join(failed)}")
    if unverified:
        print("gpu-check: no CUDA test passed, so correctness is unverified")
    if errors or run.crashed:
        print(f"gpu-check: {len(errors)} measurements raised, {len(run.crashed)} sections crashed")
    return 1 if failed or unverified or errors or run.crashed else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/gpu)")
    ap.add_argument("--quick", action="store_true", help="a ~2-minute subset: bf16, the goal shapes")
    ap.add_argument("--interpret-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    started = time.monotonic()
    if not args.interpret_smoke:
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
            return 0
        os.environ["TRITON_INTERPRET"] = "0"   # the timings need compiled kernels; read when they are defined
    started_run = _start(args)
    if isinstance(started_run, int):
        return started_run
    run, device_name = started_run

    if not run.smoke:
        print(f"gpu-check: {device_name}; " + (f"peak {run.peak.label}: {run.peak.hbm_tb_s} TB/s, "
              f"{run.peak.tflops_16bit:g} bf16 TFLOP/s" if run.peak else "peak unknown: absolute numbers only"),
              flush=True)
        _section(run, "tests", run_tests, run.plan.budgets["tests"])
    for name, fn in (("dpm_step", dpm_section), ("attention", attention_section)):
        _section(run, name, fn, time.monotonic() + run.plan.budgets[name])
    goals = judge_goals(run.rows, run.plan, run.peak, run.smoke)
    run.rows += goals

    print("gpu-check: section seconds " + ", ".join(f"{k} {v}" for k, v in run.seconds.items()))
    for g in goals:
        print(f"GOAL {g['name']}: {g['detail'] or '-'} -> {g['status']}")
    out = args.out if args.out is not None else (None if run.smoke else RESULTS / "gpu")
    if out is not None:
        info = _versions(device_name, run.smoke)
        info.update(mode=run.plan.name, seconds=time.monotonic() - started, peak=run.peak, crashed=run.crashed)
        slug = "interpreter-smoke" if run.smoke else device_slug(device_name)
        for path in write_results(out, slug, run.rows, info):
            print(f"gpu-check: wrote {path}")
    status = _exit_status(run)
    print(f"gpu-check: done in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
