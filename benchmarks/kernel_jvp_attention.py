"""Memory of attention under ``torch.func.jvp``: the flash-style JVP kernel vs materialised math attention.

    python -m benchmarks.kernel_jvp_attention --out benchmarks/results/kernels

Two tables, written as kernel_jvp_attention.csv and .md:

* analytic, for realistic shapes (B=8, H=16, d=64, N = 256 / 1024 / 4096, bf16): the bytes each path
  must allocate beyond its inputs. The kernel allocates O, dO ([B, H, N, d] in the IO dtype) and the
  log-sum-exp ([B, H, N] fp32) and keeps everything else on chip; math attention under jvp materialises
  at least S, P, dS, dP ([B, H, N, N] each), and autograd keeps P (at least) for the backward.
* measured on this CPU for moderate shapes (fp32, B=1, H=2, d=64): the peak of the CPU allocator's live
  bytes during the jvp call, from the profiler's allocation/free events (``profile_memory=True``; every
  torch CPU allocation, including ones autograd holds from C++), counted from the call's start, and what
  is still allocated when it returns (outputs plus what autograd saved; inputs require grad, as in
  training). The kernel runs through the Triton interpreter there: its tiles are numpy arrays, which stand
  for registers / shared memory on a GPU and are not torch allocations, so the measurement sees exactly
  the kernel's global-memory buffers.

A third table counts work (``benchmarks.counting``) for one jvp call at B=1, H=2, N=256, d=64, fp32:
``count_eager`` over the math path's aten ops, ``count_triton`` over the kernels' loads/stores in the
interpreter (whose block sizes, 32×16, are smaller than the GPU's, so k/v are re-read more often than on
a GPU). Both totals include the aten metadata checks functorch dispatches around the call.

Takes ~1.5 minutes on 2 cores; the interpreter dominates.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANALYTIC = [dict(B=8, H=16, N=n, d=64, dtype="bfloat16") for n in (256, 1024, 4096)]
MEASURED = [dict(B=1, H=2, N=n, d=64, dtype="float32") for n in (256, 512)]
COUNTED = dict(B=1, H=2, N=256, d=64, dtype="float32")
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def analytic(B, H, N, d, dtype) -> dict:
    """Bytes beyond the inputs: during the jvp call and kept for the backward (outputs included)."""
    e, bhn = _BYTES[dtype], B * H * N
    outputs = 2 * bhn * d * e                       # O, dO
    return {
        "kernel_jvp_peak": outputs + bhn * 4,       # + log-sum-exp
        "kernel_retained": outputs + bhn * 4,       # backward reuses q, k, v, O and the log-sum-exp
        "math_jvp_peak_min": outputs + 4 * bhn * N * e,   # S, P, dS, dP
        "math_retained_min": outputs + bhn * N * e,       # P
    }


def measure(fn, *args) -> tuple[int, int, float]:
    """(peak live bytes, bytes live at return, seconds) of the CPU allocator during fn(*args), counted
    from zero at the call (the inputs already exist). Results are kept alive until counted."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()   # earlier tensors in reference cycles must not be freed (negative bytes) inside the window
    gc.disable()
    try:
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*args)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del out
    return peak, live, seconds


def _jvp_call(B, H, N, d, dtype, requires_grad):
    """(call(impl), its inputs): torch.func.jvp of jvp_attention on seeded inputs, impl forced."""
    import torch

    from kernels import dispatch
    from kernels.attention import jvp_attention

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    prim = tuple(torch.randn(B, H, N, d, generator=g, dtype=dt).requires_grad_(requires_grad) for _ in range(3))
    tang = tuple(torch.randn(B, H, N, d, generator=g, dtype=dt) for _ in range(3))

    def call(impl):
        with dispatch.forced("attention", impl):
            return torch.func.jvp(jvp_attention, prim, tang)
    return call


def run_measured(**shape) -> dict:
    call = _jvp_call(**shape, requires_grad=True)
    row = {}
    for impl, key in (("torch", "math"), ("triton", "kernel")):
        peak, kept, sec = measure(call, impl)
        row.update({f"{key}_jvp_peak": peak, f"{key}_retained": kept, f"{key}_seconds": round(sec, 2)})
    return row


def run_counted(**shape) -> list[dict]:
    from benchmarks.counting import count_eager, count_triton

    call = _jvp_call(**shape, requires_grad=False)
    rows = []
    for impl, counter in (("torch", count_eager), ("triton", count_triton)):
        c = counter(call, impl)
        rows.append({"impl": impl, **shape, "launches": c["launches"],
                     "triton_launches": sum(op.startswith("triton:") for op in c["ops"]),
                     "bytes_read": c["bytes_read"], "bytes_written": c["bytes_written"]})
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def write(out: Path, rows: list[dict], counted: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["kind", "B", "H", "N", "d", "dtype", "kernel_jvp_peak", "kernel_retained", "math_jvp_peak",
            "math_retained", "kernel_seconds", "math_seconds"]
    with open(out / "kernel_jvp_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out / "kernel_jvp_attention_counted.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(counted[0]))
        w.writeheader()
        w.writerows(counted)
    lines = ["# Attention under torch.func.jvp: bytes beyond the inputs (MiB)", "",
             "kernel = kernels.jvp_attention (O, dO, log-sum-exp); math = materialised attention "
             "(S, P, dS, dP). *peak*: during the jvp call; *retained*: still allocated afterwards "
             "(outputs + saved for backward). Analytic rows count the unavoidable buffers (a lower bound "
             "for math); measured rows are the CPU allocator's peak (torch profiler memory events), the "
             "kernel running in the Triton interpreter.", "",
             "| kind | B×H×N×d | dtype | kernel peak | kernel retained | math peak | math retained "
             "| math/kernel peak |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['B']}×{r['H']}×{r['N']}×{r['d']} | {r['dtype']} | "
                     f"{_mib(r['kernel_jvp_peak'])} | {_mib(r['kernel_retained'])} | {_mib(r['math_jvp_peak'])} | "
                     f"{_mib(r['math_retained'])} | {r['math_jvp_peak'] / r['kernel_jvp_peak']:.1f}× |")
    lines += ["", "## Counted work of one jvp call (benchmarks.counting)", "",
              "Launches include functorch's aten metadata checks; the kernel's own launches are the triton "
              "column. The kernel's bytes read reflect the interpreter's 32×16 blocks.", "",
              "| impl | B×H×N×d | dtype | launches | triton launches | MiB read | MiB written |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in counted:
        lines.append(f"| {r['impl']} | {r['B']}×{r['H']}×{r['N']}×{r['d']} | {r['dtype']} | {r['launches']} | "
                     f"{r['triton_launches']} | {_mib(r['bytes_read'])} | {_mib(r['bytes_written'])} |")
    (out / "kernel_jvp_attention.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU measurement; read when the kernels are defined
    import torch

    torch.set_num_threads(1)
    rows = []
    for shape in ANALYTIC:
        a = analytic(**shape)
        rows.append({"kind": "analytic", **shape, **a, "math_jvp_peak": a["math_jvp_peak_min"],
                     "math_retained": a["math_retained_min"]})
    for shape in MEASURED:
        a = analytic(**shape)
        rows.append({"kind": "analytic", **shape, **a, "math_jvp_peak": a["math_jvp_peak_min"],
                     "math_retained": a["math_retained_min"]})
        rows.append({"kind": "measured", **shape, **run_measured(**shape)})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    counted = run_counted(**COUNTED)
    write(args.out, rows, counted)
    print((args.out / "kernel_jvp_attention.md").read_text())


if __name__ == "__main__":
    main()
