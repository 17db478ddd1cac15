"""Per-iteration cost of any stage, split into where the time goes.

    python -m benchmarks.profile --stage mid --config configs/digits_cmt.yaml --set mid.teacher=runs/pre
    python -m benchmarks.profile --stage post --config configs/digits_ect.yaml --set post.init=random --trace traces/

Builds the stage and its DeepSpeed engine exactly as ``engine/train.py`` does (engine.trainer.Trainer; no
checkpoints are written), then runs ``--warmup`` + ``--iters`` training iterations, timing each phase on its own:

  data             sampling indices and gathering this rank's batch onto the device
  teacher          the frozen teacher's forwards (rollout for mid, ECD's ODE step for post); also given
                   per teacher call (= per solver step: one batched call per step)
  rollout_other    the rest of pair construction: solver updates, pair assembly (the stage's ``prepare``,
                   for stages with a pipeline: mid)
  student_forward  student forward(s) and the loss (ECT's no-grad target forward included; ``prepare`` too
                   for pre and post)
  backward         ``engine.backward`` (gradient all-reduce / reduce-scatter happens here on >1 ranks)
  optimizer        ``engine.step`` (ZeRO's parameter all-gather happens here on >1 ranks)
  ema              the EMA update

Communication is not timed apart: DeepSpeed overlaps it with backward and the optimizer step, so it is
inside those two rows (with one rank there is none). Each phase is closed with a device synchronise, so
on a GPU the rows are true per-phase times (and slightly slower in total than an unsynchronised run).
Rows are appended to ``--csv`` (default benchmarks/results/profile.csv) as
(name, implementation, metric, value, p20, p50, p80, unit, device, version, timestamp), value being the
mean over the timed iterations. ``--trace DIR`` also writes a torch.profiler Chrome trace of them.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from engine.cli import entry_point

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("data", "teacher", "rollout_other", "student_forward", "backward", "optimizer", "ema")
CSV_FIELDS = ("name", "implementation", "metric", "value", "p20", "p50", "p80", "unit", "device", "version",
              "timestamp")


def version() -> str:
    """This checkout's commit (with '+dirty' when files differ) and torch's version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        sha += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return f"{sha} torch-{torch.__version__}"


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) by linear interpolation; a single value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[1], statistics.median(values), q[7]


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


class PhaseClock:
    """Accumulates seconds per phase; a phase ends with a device synchronise so its time is its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.teacher_calls = 0
        self._teacher_depth = 0
        self._teacher_start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        start, teacher_before = time.perf_counter(), self.seconds["teacher"]
        yield
        self._sync()
        # Teacher forwards inside the phase are booked to "teacher", not to this phase.
        self.seconds[name] += time.perf_counter() - start - (self.seconds["teacher"] - teacher_before)

    def watch_teacher(self, module: torch.nn.Module) -> None:
        """Time every forward of ``module`` (the outermost call only) as the teacher phase."""
        def pre(*_):
            if self._teacher_depth == 0:
                self._sync()
                self._teacher_start = time.perf_counter()
            self._teacher_depth += 1

        def post(*_):
            self._teacher_depth -= 1
            if self._teacher_depth == 0:
                self._sync()
                self.seconds["teacher"] += time.perf_counter() - self._teacher_start
                self.teacher_calls += 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


class WorkCounter:
    """Counts work as it happens, from hooks on the modules themselves: per-sample teacher forwards,
    student forwards with and without autograd, and samples backpropagated through the student."""

    KEYS = ("teacher_fwd", "student_fwd_grad", "student_fwd_nograd", "student_bwd")

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None):
        self.counts = dict.fromkeys(self.KEYS, 0)
        self._depth = defaultdict(int)
        self._hook(student, "student")
        if teacher is not None:
            self._hook(teacher, "teacher")
        student.register_full_backward_hook(self._backward)
        # The student's inputs never require grad, so the hook fires on its output gradient, which is
        # what we count; torch warns about exactly that.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs")

    def _hook(self, module: torch.nn.Module, who: str) -> None:
        def pre(_, args):
            if self._depth[who] == 0:   # a net calling itself (e.g. a guided batch) counts once
                n = int(args[0].shape[0])
                key = "teacher_fwd" if who == "teacher" else \
                    ("student_fwd_grad" if torch.is_grad_enabled() else "student_fwd_nograd")
                self.counts[key] += n
            self._depth[who] += 1

        def post(*_):
            self._depth[who] -= 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def _backward(self, _, grad_input, grad_output):
        self.counts["student_bwd"] += int(grad_output[0].shape[0])


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "peak_cuda_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the whole process's peak, the honest CPU figure we have.
    return "peak_process_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageProfiler:
    """One stage's trainer, stepped an iteration at a time with every phase timed."""

    def __init__(self, stage: str, config: str | Path, overrides: list[str], run_dir: str | Path):
        from engine.config import load_config
        from engine.trainer import Trainer

        self.cfg = load_config(config, ["train.progress=false", *overrides])
        self.stage_name, self.name = stage, f"{stage}:{Path(config).stem}"
        self.trainer = Trainer(self.cfg, stage, run_dir)
        self.stage = self.trainer.stage
        self.device = self.trainer.world.device
        self.clock = PhaseClock(self.device)
        teacher = getattr(self.stage, "teacher", None)
        if teacher is not None:
            self.clock.watch_teacher(teacher)
        self.work = WorkCounter(self.stage.model, teacher)
        self.iterations: list[dict[str, float]] = []
        self.step = 0

    def iteration(self) -> dict[str, float]:
        """One optimiser step (grad_accum micro-steps); returns its seconds per phase."""
        tr, clock, t = self.trainer, self.clock, self.cfg.train
        engine = tr.student.engine
        clock.seconds.clear()
        calls_before = clock.teacher_calls
        work_before = dict(self.work.counts)
        start = time.perf_counter()
        for micro_step in range(t.grad_accum):
            seed = (t.seed * 1_000_003 + self.step * t.grad_accum + micro_step) % 2**63
            torch.manual_seed(seed ^ 1)
            generator = torch.Generator(self.device).manual_seed(seed)
            with clock.phase("data"):
                batch = tr.batches.batch(self.step, micro_step * tr.world.students + tr.world.rank)
            with clock.phase("rollout_other" if self.stage.pipeline is not None else "student_forward"):
                prepared = self.stage.prepare(batch, generator)
            with clock.phase("student_forward"):
                loss = self.stage.loss(engine, prepared)
            with clock.phase("backward"):
                engine.backward(loss)
            with clock.phase("optimizer"):
                engine.step()
        self.step += 1
        with clock.phase("ema"):
            tr.student.update_ema(self.step)
        row = {p: clock.seconds.get(p, 0.0) for p in PHASES}
        row["total"] = time.perf_counter() - start
        row["teacher_calls"] = clock.teacher_calls - calls_before
        for key, n in self.work.counts.items():   # per training pair (pairs = images for pre/post)
            row[f"{key}_per_pair"] = (n - work_before[key]) / t.batch_size
        return row

    def run(self, warmup: int, iters: int, trace: Path | None = None) -> None:
        for _ in range(warmup):
            self.iteration()
        ctx = contextlib.nullcontext()
        if trace is not None:
            trace.mkdir(parents=True, exist_ok=True)
            ctx = torch.profiler.profile(record_shapes=True, profile_memory=True)
        with ctx as prof:
            for _ in range(iters):
                self.iterations.append(self.iteration())
        if trace is not None:
            prof.export_chrome_trace(str(trace / f"{self.name.replace(':', '-')}.json"))

    def rows(self) -> list[dict]:
        from kernels import dispatch

        device = self.device
        impl = ";".join(f"{op}={dispatch.last_implementation(op)}" for op in dispatch.OPS
                        if dispatch.last_implementation(op)) or "torch-only"
        common = {"name": self.name, "implementation": impl, "device": _device_name(device),
                  "version": version(), "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}
        out = []

        def add(metric, values, unit):
            p20, p50, p80 = quantiles(values)
            out.append({**common, "metric": metric, "value": f"{statistics.fmean(values):.6g}", "p20": f"{p20:.6g}",
                        "p50": f"{p50:.6g}", "p80": f"{p80:.6g}", "unit": unit})

        for phase in (*PHASES, "total"):
            add(f"{phase}_s", [it[phase] for it in self.iterations], "s/iter")
        calls = [it["teacher_calls"] for it in self.iterations]
        if any(calls):
            add("teacher_per_call_s", [it["teacher"] / max(it["teacher_calls"], 1) for it in self.iterations], "s/call")
        add("pairs_per_s", [self.cfg.train.batch_size / it["total"] for it in self.iterations], "pairs/s")
        for key in WorkCounter.KEYS:
            add(f"{key}_per_pair", [it[f"{key}_per_pair"] for it in self.iterations], "per pair")
        metric, mb = peak_memory_mb(device)
        add(metric, [mb], "MiB")
        return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}threads"


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=("pre", "mid", "post"))
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "profile.csv"))
    p.add_argument("--trace", default=None, help="directory for a torch.profiler Chrome trace")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be at least 1")
    with tempfile.TemporaryDirectory() as run_dir:
        prof = StageProfiler(args.stage, args.config, args.overrides, run_dir)
        prof.run(args.warmup, args.iters, Path(args.trace) if args.trace else None)
    rows = prof.rows()
    append_rows(Path(args.csv), rows)
    width = max(len(r["metric"]) for r in rows)
    print(f"{prof.name}  ({rows[0]['device']}, {args.iters} iterations, batch {prof.cfg.train.batch_size})")
    for r in rows:
        print(f"  {r['metric']:<{width}}  mean {float(r['value']):10.4g}  p20 {float(r['p20']):10.4g}  "
              f"p50 {float(r['p50']):10.4g}  p80 {float(r['p80']):10.4g}  {r['unit']}")
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
