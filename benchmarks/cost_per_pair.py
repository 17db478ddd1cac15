"""Cost per training pair: CMT vs consistency training (CT), consistency distillation (CD-Euler,
CD-Heun) and Slow CMT (docs/method.md §8, paper App. C), counted while they run and timed in one run.

    python -m benchmarks.cost_per_pair --out benchmarks/results/cost_per_pair [--teacher runs/pre]

Every method trains the same student network on the same batch with the same distance (the digits
configs' feature distance): CMT is mid-training (configs/digits_cmt.yaml, N=16 DPM-Solver++ order 3),
Slow CMT the same with one solve per pair, CT is ECT and CD is ECD (configs/digits_ect.yaml with
post.method=ecd). Work is counted by hooks on the teacher and student modules (benchmarks.profile's
WorkCounter): per-sample teacher forwards, student forwards with/without autograd, samples
backpropagated. Times are per iteration, the methods interleaved round-robin in one process so that
machine load hits them alike; the ratio is each method's median over CMT's.

Without --teacher a randomly initialised EDM teacher is exported and used: cost does not depend on the
teacher's weights, only on its architecture (that of the student here, as in the paper's CIFAR-10 runs).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The paper's App. C training cost per iteration relative to CMT (CIFAR-10).
PAPER = {"cmt": 1.0, "ct": 0.79, "cd_euler": 0.98, "cd_heun": 1.17}
METHODS = {   # name: (stage, config, overrides)
    "cmt": ("mid", "digits_cmt.yaml", ["mid.method=cmt"]),
    "ct": ("post", "digits_ect.yaml", ["post.method=ect", "post.init=random"]),
    "cd_euler": ("post", "digits_ect.yaml", ["post.method=ecd", "post.ecd_solver=euler", "post.init=random"]),
    "cd_heun": ("post", "digits_ect.yaml", ["post.method=ecd", "post.ecd_solver=heun", "post.init=random"]),
    "slow_cmt": ("mid", "digits_cmt.yaml", ["mid.method=slow_cmt"]),
}


def random_teacher(out_dir: Path) -> Path:
    """Export a randomly initialised EDM teacher of the digits architecture (for timing and counting)."""
    import torch

    from engine.config import load_config
    from engine.models.factory import build_raw_network
    from engine.models.weights import export_network

    cfg = load_config(ROOT / "configs" / "digits.yaml")
    torch.manual_seed(0)
    export_network(build_raw_network(cfg), cfg, out_dir / "export", meta={"stage": "pre", "kimg": 0.0})
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cost_per_pair"))
    p.add_argument("--teacher", default=None, help="EDM pre-training run dir (default: a random-init one)")
    p.add_argument("--rounds", type=int, default=5, help="timed iterations per method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="applied to every method, e.g. train.batch_size=64")
    args = p.parse_args(argv)
    if "cmt" not in args.methods:
        p.error("--methods must include cmt: every ratio is relative to it")
    from benchmarks.profile import WorkCounter, append_rows, quantiles, StageProfiler

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = Path(args.teacher) if args.teacher else random_teacher(tmp / "teacher")
        profilers = {}
        for m in args.methods:
            stage, config, over = METHODS[m]
            key = "mid.teacher" if stage == "mid" else "post.teacher"
            over = [*over, *args.overrides] + ([f"{key}={teacher}"] if m != "ct" else [])
            profilers[m] = StageProfiler(stage, ROOT / "configs" / config, over, tmp / m)
            profilers[m].name = m
        for _ in range(args.warmup):
            for prof in profilers.values():
                prof.iteration()
        for i in range(args.rounds):
            for m, prof in profilers.items():
                prof.iterations.append(prof.iteration())
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{m} {prof.iterations[-1]['total']:.2f}s" for m, prof in profilers.items()), file=sys.stderr)

    cmt_time = statistics.median(it["total"] for it in profilers["cmt"].iterations)
    table = []
    for m, prof in profilers.items():
        its = prof.iterations
        batch = prof.cfg.train.batch_size
        row = {"method": m, "pairs_per_iter": batch}
        for key in WorkCounter.KEYS:
            vals = {round(it[f"{key}_per_pair"], 4) for it in its}
            row[f"{key}_per_pair"] = statistics.fmean(it[f"{key}_per_pair"] for it in its) if len(vals) > 1 \
                else vals.pop()
        p20, p50, p80 = quantiles([it["total"] for it in its])
        row.update(sec_per_iter_p20=p20, sec_per_iter_p50=p50, sec_per_iter_p80=p80,
                   time_vs_cmt=p50 / cmt_time, paper_time_vs_cmt=PAPER.get(m))
        row.update({f"{ph}_s": statistics.median(it[ph] for it in its)
                    for ph in ("teacher", "rollout_other", "student_forward", "backward", "optimizer")})
        table.append(row)
        append_rows(out.parent / "profile.csv", prof.rows())

    with open(out / "cost_per_pair.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    (out / "cost_per_pair.json").write_text(json.dumps(
        {"device": profilers["cmt"].rows()[0]["device"], "rounds": args.rounds, "teacher": str(args.teacher or
         "random init"), "table": table}, indent=2))
    print(f"{'method':<9} {'teacher/pair':>12} {'fwd/pair':>9} {'nograd/pair':>11} {'bwd/pair':>8} "
          f"{'s/iter':>7} {'vs CMT':>7} {'paper':>6}")
    for r in table:
        paper = "" if r["paper_time_vs_cmt"] is None else f"{r['paper_time_vs_cmt']:.2f}"
        print(f"{r['method']:<9} {r['teacher_fwd_per_pair']:>12.3f} {r['student_fwd_grad_per_pair']:>9.3f} "
              f"{r['student_fwd_nograd_per_pair']:>11.3f} {r['student_bwd_per_pair']:>8.3f} "
              f"{r['sec_per_iter_p50']:>7.2f} {r['time_vs_cmt']:>7.2f} {paper:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
