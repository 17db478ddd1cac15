"""2-step sampling of consistency models at several intermediate noise levels t_mid, per exported network.

    python -m benchmarks.t_mid_sweep --out benchmarks/results/claims_authors_l2/t_mid \\
        --runs runs/claims_authors_l2/mid_cmt runs/claims_authors_l2/post_ect_cmt ...

The 2-step sampler re-noises the 1-step sample to t_mid and denoises once more; which t_mid works best
depends on the network (the authors evaluate ECT post-trained CIFAR-10 models at 0.821, mid-training at
0.77569). A post-training run that moves the best t_mid looks worse at a fixed one, so the ablation's
2-step scores are compared here across a grid. Each run dir's export is scored with the ablation's scorer
(benchmarks.claims: 1000 samples, fd_digits_cnn, seeds as there), its config's other sampler settings kept.
Writes t_mid.csv (one row per run and t_mid) and t_mid.md (one row per run, the best t_mid marked).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from benchmarks import claims

T_MID = (0.5, 0.821, 1.2, 2.0, 3.0, 5.0)


def score_2step(export_dir: Path, t_mid: float, num_samples: int) -> float:
    return claims._score(export_dir, num_samples, steps=(2,), t_mid=t_mid)["fd_2step"]


def cached(run_dir: Path, t_mid: float, num_samples: int) -> float:
    """score_2step of run_dir/export, cached in run_dir/t_mid_scores.json by t_mid and sample count."""
    return claims.cached(run_dir / "t_mid_scores.json", f"{t_mid:g}@{num_samples}",
                         lambda: score_2step(run_dir / "export", t_mid, num_samples))


def label(run: Path) -> str:
    """A run's name in the tables: its parent folder and its own (runs of two ablations share names)."""
    return f"{run.parent.name}/{run.name}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run dirs with an export/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--t-mid", nargs="+", type=float, default=list(T_MID))
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows, labels = [], [label(run) for run in args.runs]
    for run, name in zip(args.runs, labels):
        for t in args.t_mid:
            rows.append({"run": name, "kimg": json.loads((run / "export" / "meta.json").read_text())["kimg"],
                         "t_mid": t, "fd_2step": cached(run, t, args.num_samples)})
            print(f"{name} t_mid {t:g}: {rows[-1]['fd_2step']:.3f}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "t_mid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "kimg", "t_mid", "fd_2step"])
        w.writeheader()
        w.writerows({**r, "fd_2step": round(r["fd_2step"], 4)} for r in rows)
    lines = [f"2-step fd_digits_cnn ({args.num_samples} samples) at each t_mid; the best in bold.", "",
             "| run | kimg | " + " | ".join(f"t_mid {t:g}" for t in args.t_mid) + " |",
             "|---" * (len(args.t_mid) + 2) + "|"]
    for name in labels:
        mine = [r for r in rows if r["run"] == name]
        best = min(r["fd_2step"] for r in mine)
        lines.append(f"| {name} | {mine[0]['kimg']:g} | " + " | ".join(
            f"**{r['fd_2step']:.2f}**" if r["fd_2step"] == best else f"{r['fd_2step']:.2f}" for r in mine) + " |")
    (args.out / "t_mid.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 't_mid.csv'} and t_mid.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
