"""The fused (E)LatentLPIPS feature distance (csrc/, CPU extension) against the eager PyTorch reference.

    python -m benchmarks.feature_distance [--out benchmarks/results/kernels] [--reps 7]

One tap of B=16, C=256, 32×32 float32 features (16.8 MB per map), the per-sample distance without channel
weights, two passes: ``forward`` and ``forward+backward`` (gradient w.r.t. the student's features f0 only,
the training case: the target's features are computed without a graph).

Time: both implementations run in this process, interleaved rep by rep (so machine noise hits both), the
median of ``--reps`` is reported, at torch.set_num_threads(1) (a fair single-core comparison) and at 2
threads (all cores of this machine). The ratio is eager / fused.

Bytes and launches: the eager reference's aten ops are counted by ``benchmarks.counting.count_eager`` (each
dispatched op = one launch; bytes per op from its tensor arguments and results). The fused op's figures
are analytic, from what its kernels access: forward reads f0 and f1 once and writes [B] (CUDA: plus one
partial per tile, written and re-read by a second tiny launch); backward reads grad [B], f0 and f1 once and
writes ∂f0. The kernels' second/third channel sweeps re-read a tile that was just loaded (cache, not DRAM)
and are not counted. Launch counts are the CUDA kernels' (2 forward, 1 backward); the CPU op is one call.
Writes ``feature_distance.csv`` and ``feature_distance.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import kernels.perceptual as fd
from benchmarks.counting import count_eager
from kernels import dispatch

SHAPE = (16, 256, 32, 32)
FIELDS = ["pass", "threads", "eager_ms", "fused_ms", "speedup", "eager_launches", "fused_launches",
          "eager_bytes", "fused_bytes", "bytes_ratio"]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _run(impl: str, f0: torch.Tensor, f1: torch.Tensor, backward: bool) -> None:
    with dispatch.forced("feature_distance", impl):
        if backward:
            x = f0.detach().requires_grad_(True)
            fd.feature_distance(x, f1).sum().backward()
        else:
            with torch.no_grad():
                fd.feature_distance(f0, f1)


def fused_bytes(backward: bool) -> tuple[int, int]:
    """(launches, bytes) of the fused op from its kernels' accesses (see the module docstring)."""
    B, _, H, W = SHAPE
    feature_map = 4 * torch.Size(SHAPE).numel()
    partials = 4 * B * -(-H * W // 32)            # CUDA: one fp32 partial per 32-position tile, written + read
    launches, total = 2, 2 * feature_map + 4 * B + 2 * partials
    if backward:
        launches, total = launches + 1, total + 4 * B + 2 * feature_map + feature_map
    return launches, total


def eager_counts(backward: bool) -> tuple[int, int]:
    f0, f1 = _inputs()
    counted = count_eager(_run, "torch", f0, f1, backward)
    return counted["launches"], counted["bytes_read"] + counted["bytes_written"]


def timings(backward: bool, threads: int, reps: int) -> tuple[float, float]:
    """Median seconds (eager, fused), measured interleaved after one warm-up each."""
    torch.set_num_threads(threads)
    f0, f1 = _inputs()
    times = {"torch": [], "cpp": []}
    for rep in range(reps + 1):
        for impl in ("torch", "cpp"):
            started = time.perf_counter()
            _run(impl, f0, f1, backward)
            if rep:
                times[impl].append(time.perf_counter() - started)
    return statistics.median(times["torch"]), statistics.median(times["cpp"])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/kernels")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    if fd.unavailable_reason("cpp") is not None:
        raise SystemExit(f"the CPU extension is not built ({fd.unavailable_reason('cpp')}): "
                         "pip install --no-build-isolation -e .")
    threads_before = torch.get_num_threads()
    rows = []
    for backward in (False, True):
        eager_launches, eager_total = eager_counts(backward)
        fused_launches, fused_total = fused_bytes(backward)
        for threads in (1, 2):
            eager_s, fused_s = timings(backward, threads, args.reps)
            rows.append({"pass": "forward+backward" if backward else "forward", "threads": threads,
                         "eager_ms": round(1e3 * eager_s, 2), "fused_ms": round(1e3 * fused_s, 2),
                         "speedup": round(eager_s / fused_s, 2), "eager_launches": eager_launches,
                         "fused_launches": fused_launches, "eager_bytes": eager_total,
                         "fused_bytes": fused_total, "bytes_ratio": round(eager_total / fused_total, 2)})
    torch.set_num_threads(threads_before)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "feature_distance.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Fused feature distance (CPU extension) vs eager reference — B,C,H,W = {SHAPE}, float32, no weights",
             "",
             f"Median of {args.reps} interleaved reps; bytes: eager counted by benchmarks.counting.count_eager, fused "
             "analytic from its kernels (f0, f1 read once, [B] written; backward adds grad [B], f0, f1, ∂f0).",
             "",
             "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    lines += ["| " + " | ".join(str(row[f]) for f in FIELDS) + " |" for row in rows]
    (out / "feature_distance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
