"""Counted work of one DPM-Solver++ step: the fused Triton kernel against the eager PyTorch reference.

    python -m benchmarks.kernel_dpm_solver_step --out benchmarks/results/kernels [--time]

For orders 1/2/3, float32 and bfloat16 IO, a B=64 batch of 4×64×64 latents (the SD-latent shape), with
and without the trajectory-slot store, reports launches, bytes read/written and tensor passes
(bytes / (numel × IO element size)) measured by ``benchmarks.counting``: the kernel's loads and stores
counted in Triton's CPU interpreter (``count_triton``), the reference's aten ops counted by dispatch
(``count_eager``). Nothing is derived from a formula. The eager "slot" row is the reference's copy into the
slot — the same work as the ``torch.stack`` of the states the rollout used to do after the solve.

Time: the interpreter is not a speed measure, and on CPU the fused step's ``auto`` path *is* the eager
reference, so by default no time is reported. ``--time`` adds the one natively comparable CPU number:
the eager reference against the same function compiled by ``torch.compile`` (inductor emits one fused C++
loop: the CPU analogue of the kernel's single pass), order 3 only, because compiling costs ~45 s here.
Writes ``kernel_dpm_solver_step.csv`` and ``.md`` to ``--out``.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter counts the kernel's traffic; set before kernels/ is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")   # (read at decoration). Importers (gpu_check) keep theirs.

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from benchmarks.counting import count_eager, count_triton
from kernels import dispatch
from kernels.dpm_solver_step import dpm_solver_pp_step, dpm_solver_step_torch

SHAPE = (64, 4, 64, 64)
N_SLOTS = 16
# An order-k step of the N=16 λ-uniform CMT grid (engine.formulas.dpm_solver.dpm_solver_pp_coefficients, rounded).
COEFFS = {1: (0.829, 0.171, 0.0, 0.0), 2: (0.829, 0.52, -0.349, 0.0), 3: (0.829, 1.63, -1.12, 0.661)}
FIELDS = ["impl", "dtype", "order", "slot", "launches", "bytes_read", "bytes_written",
          "read_passes", "write_passes", "total_passes", "ops"]


def _case(order: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(dtype) for _ in range(order + 1)]


def _row(impl, dtype, order, slot, counted, tensor_bytes):
    return {"impl": impl, "dtype": str(dtype).removeprefix("torch."), "order": order, "slot": slot,
            "launches": counted["launches"], "bytes_read": counted["bytes_read"],
            "bytes_written": counted["bytes_written"],
            "read_passes": round(counted["bytes_read"] / tensor_bytes, 3),
            "write_passes": round(counted["bytes_written"] / tensor_bytes, 3),
            "total_passes": round((counted["bytes_read"] + counted["bytes_written"]) / tensor_bytes, 3),
            "ops": " ".join(op.removeprefix("aten.").removesuffix(".default") for op in counted["ops"])}


def count_rows() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for order in (1, 2, 3):
            tensors = _case(order, dtype)
            tensor_bytes = tensors[0].numel() * tensors[0].element_size()
            buffer = torch.empty((SHAPE[0], N_SLOTS, *SHAPE[1:]), dtype=dtype)      # [B, N, ...] pair buffer
            for slot in (False, True):
                kwargs = {"coeffs": COEFFS[order], "slot": buffer[:, 3] if slot else None}
                with dispatch.forced("dpm_solver_step", "triton"):
                    fused = count_triton(dpm_solver_pp_step, *tensors, **kwargs)
                eager = count_eager(dpm_solver_step_torch, *tensors, **kwargs)
                rows.append(_row("triton", dtype, order, slot, fused, tensor_bytes))
                rows.append(_row("eager", dtype, order, slot, eager, tensor_bytes))
    return rows


def time_rows(repeats: int = 7) -> list[dict]:
    """Median CPU seconds of the eager reference and its torch.compile'd single loop, order 3."""
    def step(x, d0, d1, d2, coeffs):
        return dpm_solver_step_torch(x, d0, d1, d2, coeffs=coeffs)

    compiled = torch.compile(step, dynamic=False)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        tensors = _case(3, dtype)
        coeffs = tuple(torch.tensor(c, dtype=torch.float64) for c in COEFFS[3])   # tensors: no recompiles
        timings = {}
        for name, fn in (("eager", step), ("compiled", compiled)):
            fn(*tensors, coeffs)                                                   # warm-up / compile
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(*tensors, coeffs)
                samples.append(time.perf_counter() - start)
            timings[name] = statistics.median(samples)
        out.append({"dtype": str(dtype).removeprefix("torch."), "order": 3, "eager_s": round(timings["eager"], 5),
                    "compiled_s": round(timings["compiled"], 5),
                    "eager_over_compiled": round(timings["eager"] / timings["compiled"], 2)})
    return out


def markdown(rows: list[dict], timings: list[dict] | None) -> str:
    lines = [f"# One DPM-Solver++ step, counted work (B×C×H×W = {'×'.join(map(str, SHAPE))})", "",
             "Passes = bytes / (numel × IO element size). `slot`: x_next also stored into a [B, N, ...] pair-buffer "
             "slot. Measured: kernel loads/stores in Triton's interpreter, reference aten ops by dispatch.", "",
             "| dtype | order | slot | impl | launches | read passes | write passes | total passes | MB read | MB written |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['order']} | {'yes' if r['slot'] else 'no'} | {r['impl']} | {r['launches']} | "
                     f"{r['read_passes']:g} | {r['write_passes']:g} | {r['total_passes']:g} | "
                     f"{r['bytes_read'] / 2**20:.1f} | {r['bytes_written'] / 2**20:.1f} |")
    lines += ["", "Eager ops per step: " + "; ".join(
        f"{r['dtype']} order {r['order']}{' +slot' if r['slot'] else ''}: {r['ops']}"
        for r in rows if r["impl"] == "eager" and r["order"] == 3), ""]
    if timings:
        lines += ["CPU time, order 3 (1 thread; eager reference vs torch.compile's fused loop, median):", "",
                  "| dtype | eager s | compiled s | eager / compiled |", "|---|---|---|---|"]
        lines += [f"| {t['dtype']} | {t['eager_s']} | {t['compiled_s']} | {t['eager_over_compiled']} |" for t in timings]
    else:
        lines.append("No time reported: the interpreter is not a speed measure and on CPU the fused step's "
                     "path is the eager reference itself; `--time` compares eager with torch.compile (~45 s compile).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels")
    parser.add_argument("--time", action="store_true", help="also time eager vs torch.compile on CPU (order 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = count_rows()
    timings = time_rows() if args.time else None
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "kernel_dpm_solver_step.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, timings)
    (args.out / "kernel_dpm_solver_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
