"""The paper's initialisation claim at small scale, for consistency models and for MeanFlow.

    python -m benchmarks.claims --teacher runs/teacher --out benchmarks/results/claims
    python -m benchmarks.claims --form meanflow --teacher runs/fm-teacher --out benchmarks/results/claims_meanflow

Consistency form: ECT post-training (configs/digits_ect.yaml) from CMT, KD, teacher and random init, plus
Slow CMT run only long enough to measure its cost. MeanFlow form: MeanFlow post-training
(configs/digits_meanflow.yaml) from MeanFlow-CMT (configs/digits_mf_cmt.yaml), the flow-matching teacher
and random init. Every arm post-trains with the same config (constant lr, as in the paper's ablation)
for the same number of images; EMA snapshots are scored with 1- and 2-step sampling as training goes.
Mid-training arms get the same mid budget; their cost (teacher NFEs per pair, counted by the engine,
and seconds per kimg) is measured in the same run. Writes curves.csv, mid_cost.csv, claims.png and
summary.json; reruns reuse finished run dirs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Per form: mid config, post config, the mid-training methods (init arms besides teacher and random),
# and the post-training method's name for the plot.
FORMS = {
    "consistency": {"mid": "digits_cmt.yaml", "post": "digits_ect.yaml", "mid_methods": ("cmt", "kd"),
                    "cost_only": ("slow_cmt",), "title": "ECT"},
    "meanflow": {"mid": "digits_mf_cmt.yaml", "post": "digits_meanflow.yaml", "mid_methods": ("cmt",),
                 "cost_only": (), "title": "MeanFlow"},
}


def train(stage: str, config: str, run_dir: Path, overrides: list[str]) -> None:
    from engine.cli.train import train as train_stage

    train_stage(stage, ROOT / "configs" / config, run_dir, ["train.progress=false", *overrides])


def score_snapshots(run_dir: Path, num_samples: int) -> list[dict]:
    from engine.eval.frechet import METRIC_NAME
    from engine.eval.report import report
    from engine.models.weights import load_exported

    rows = []
    for snap in sorted((run_dir / "snapshots").glob("kimg-*")):
        cfg, net, meta = load_exported(snap)
        row = {"kimg": meta["kimg"]}
        for steps in (1, 2):
            row[f"fd_{steps}step"] = report(net, cfg, meta, num_samples, include_untrained=False,
                                            steps=steps)["model"][METRIC_NAME]
        rows.append(row)
    return rows


def mid_cost(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]     # not the score rows
    last = rows[-1]
    steady = rows[1:] or rows   # the first interval includes start-up
    return {"teacher_nfe_per_pair": last["teacher_nfe"] / last["pairs"],
            "sec_per_kimg": sum(r["sec_per_kimg"] for r in steady) / len(steady)}


def plot(curves: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, steps in zip(axes, (1, 2)):
        for init, rows in curves.items():
            ax.plot([r["kimg"] for r in rows], [r[f"fd_{steps}step"] for r in rows], marker="o", ms=3, label=f"{init} init")
        ax.set_title(f"{title} post-training, {steps}-step sampling")
        ax.set_xlabel("post-training kimg")
        ax.set_ylabel("fd_digits_cnn (1000 samples)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--form", choices=sorted(FORMS), default="consistency")
    p.add_argument("--teacher", required=True,
                   help="pre-training run dir: the EDM teacher (consistency) or the flow-matching one (meanflow)")
    p.add_argument("--out", default=None, help="default benchmarks/results/claims[_meanflow]")
    p.add_argument("--mid-kimg", type=float, default=25.6)
    p.add_argument("--post-kimg", type=float, default=25.6)
    p.add_argument("--snapshot-kimg", type=float, default=3.2)
    p.add_argument("--slow-cmt-kimg", type=float, default=2.56)
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)
    form = FORMS[args.form]
    out = Path(args.out or f"benchmarks/results/claims{'' if args.form == 'consistency' else '_' + args.form}")
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher)

    mids = {m: out / f"mid_{m}" for m in form["mid_methods"]}
    for method, run_dir in mids.items():
        train("mid", form["mid"], run_dir,
              [f"mid.teacher={teacher}", f"mid.method={method}", f"train.total_kimg={args.mid_kimg}"])
    cost_runs = dict(mids)
    for method in form["cost_only"]:
        cost_runs[method] = out / f"mid_{method}"
        train("mid", form["mid"], cost_runs[method],
              [f"mid.teacher={teacher}", f"mid.method={method}", f"train.total_kimg={args.slow_cmt_kimg}",
               "train.log_every_kimg=0.64"])
    cost = {m: mid_cost(d) for m, d in cost_runs.items()}

    init_from = {**{m: ("mid", d) for m, d in mids.items()}, "teacher": ("teacher", teacher), "random": ("random", None)}
    curves = {}
    for init in init_from:
        kind, src = init_from[init]
        run_dir = out / f"post_{init}"
        over = [f"post.init={kind}", "optim.schedule=constant", f"train.total_kimg={args.post_kimg}",
                f"train.snapshot_every_kimg={args.snapshot_kimg}"]
        if src is not None:
            over.append(f"post.init_from={src}")
        train("post", form["post"], run_dir, over)
        curves[init] = score_snapshots(run_dir, args.num_samples)
        print(f"{init}: {curves[init][-1]}", file=sys.stderr)

    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["init", "post_kimg", "fd_1step", "fd_2step"])
        for init, rows in curves.items():
            for r in rows:
                w.writerow([init, r["kimg"], f"{r['fd_1step']:.4f}", f"{r['fd_2step']:.4f}"])
    with open(out / "mid_cost.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mid_method", "teacher_nfe_per_pair", "sec_per_kimg", "time_vs_cmt"])
        for m, c in cost.items():
            w.writerow([m, f"{c['teacher_nfe_per_pair']:.3f}", f"{c['sec_per_kimg']:.2f}",
                        f"{c['sec_per_kimg'] / cost['cmt']['sec_per_kimg']:.2f}"])
    plot(curves, out / "claims.png", form["title"])

    summary = {"form": args.form, "mid_cost": cost, "final": {i: rows[-1] for i, rows in curves.items()}}
    for steps in (1, 2):
        key = f"fd_{steps}step"
        goal = curves["teacher"][-1][key]
        reach = next((r["kimg"] for r in curves["cmt"] if r[key] <= goal), None)
        summary[f"cmt_kimg_to_reach_teacher_init_final_{steps}step"] = reach
        summary[f"claim_cmt_under_half_{steps}step"] = reach is not None and reach < args.post_kimg / 2
        if "kd" in curves:
            summary[f"claim_kd_worse_than_cmt_{steps}step"] = curves["kd"][-1][key] > curves["cmt"][-1][key]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
