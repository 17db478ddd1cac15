"""Why ECT post-training degrades a mid-trained start on the digits: named post-training variants, each one
change from the authors'-recipe ECT arm of ``benchmarks.claims --recipe authors``, scored as they train.

    python -m benchmarks.claims_diagnosis --claims-runs runs/claims_authors --teacher runs/demo/pre \\
        --out benchmarks/results/claims_authors/diagnosis --variants loss_l2_cmt loss_l2_teacher ...

Every variant post-trains from one of the ablation's starts (its CMT or KD mid-training run, the teacher, or
random init) with the arm's overrides plus its own, snapshots every 3.2 kimg (EMA weights), and is scored with
the ablation's scorer (1000 samples, 1- and 2-step fd_digits_cnn, cached in each run dir). Writes
variants.csv (one row per snapshot, with the start's score at kimg 0) and variants.md; reruns reuse finished
run dirs and cached scores.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from benchmarks.claims import AUTHORS_EMA_BETA, AUTHORS_T_MID, Task, _cached_score, recipe_overrides, run_tasks, \
    score_snapshots

# The authors'-recipe ECT arm as benchmarks/results/claims_authors/ ran it: configs/digits_ect.yaml + --recipe
# authors, constant lr, and the feature distance digits_ect.yaml used then (it now uses ECT's l2, as found here).
ARM = [*recipe_overrides("authors", "post", AUTHORS_T_MID, AUTHORS_EMA_BETA["post"]), "optim.schedule=constant",
       "train.snapshot_every_kimg=3.2", "post.loss=feature"]

# name: (start, kimg, overrides beyond ARM, what it tests)
VARIANTS = {
    "loss_l2_cmt": ("cmt", 28.8, ["post.loss=l2"], "ECT's own distance, the unsquared L2 norm / (t - r)"),
    "loss_l2_kd": ("kd", 28.8, ["post.loss=l2"], "the same from the KD start"),
    "loss_l2_teacher": ("teacher", 28.8, ["post.loss=l2"], "the same from the teacher"),
    "loss_l2_random": ("random", 28.8, ["post.loss=l2"], "the same from random init"),
    "batch512_cmt": ("cmt", 38.4, ["train.batch_size=512"], "the arm at 4x the batch, the same 75 steps"),
    "loss_l2_batch512_cmt": ("cmt", 38.4, ["post.loss=l2", "train.batch_size=512"],
                             "ECT's distance at 4x the batch, 75 steps"),
    "loss_l2_early_cmt": ("cmt", 3.2, ["post.loss=l2", "train.snapshot_every_kimg=0.64"],
                          "ECT's distance, the first 25 steps scored every 5"),
    "loss_l2_adam_early_cmt": ("cmt", 3.2, ["post.loss=l2", "optim.name=adam", "train.snapshot_every_kimg=0.64"],
                               "the same with Adam, which has no RAdam's un-normalised first steps"),
    "loss_l2_early_kd": ("kd", 3.2, ["post.loss=l2", "train.snapshot_every_kimg=0.64"],
                         "ECT's distance from KD, the first 25 steps scored every 5"),
    "loss_l2_adam_early_kd": ("kd", 3.2, ["post.loss=l2", "optim.name=adam", "train.snapshot_every_kimg=0.64"],
                              "the same with Adam"),
    "loss_l2_raw_early_kd": ("kd", 1.28, ["post.loss=l2", "train.ema_beta=0.0", "train.snapshot_every_kimg=0.128"],
                             "ECT's distance from KD, the raw weights (no EMA) after each of the first 10 steps"),
    "loss_l2_adam_raw_early_kd": ("kd", 1.28, ["post.loss=l2", "optim.name=adam", "train.ema_beta=0.0",
                                               "train.snapshot_every_kimg=0.128"], "the same with Adam"),
    "loss_l2_adam_cmt": ("cmt", 28.8, ["post.loss=l2", "optim.name=adam"], "ECT's distance with Adam"),
    "loss_l2_adam_kd": ("kd", 28.8, ["post.loss=l2", "optim.name=adam"], "the same from the KD start"),
    "loss_l2_adam_teacher": ("teacher", 28.8, ["post.loss=l2", "optim.name=adam"], "the same from the teacher"),
    "loss_l2_warmup_kd": ("kd", 28.8, ["post.loss=l2", "optim.warmup_kimg=1.28"],
                          "ECT's distance, RAdam with the lr warmed up over the first 10 steps, from KD"),
    "loss_l2sq_cmt": ("cmt", 28.8, ["post.loss=l2_squared"],
                      "the squared L2 / (t - r): a squared distance without the perceptual net"),
    "loss_l2sq_teacher": ("teacher", 28.8, ["post.loss=l2_squared"], "the same from the teacher"),
    "loss_l2_from_l2mid": ("cmt_l2mid", 28.8, ["post.loss=l2"],
                           "ECT's distance from a CMT start mid-trained with L2 too (no change of metric)"),
    "loss_l2_from_kd_l2mid": ("kd_l2mid", 28.8, ["post.loss=l2"], "the same from KD mid-trained with L2"),
    "loss_l2_from_cmt_16x": ("cmt_16x", 9.6, ["post.loss=l2"],
                             "ECT's distance from CMT at KD's teacher compute (the ablation's post budget)"),
}

# Extra mid-trained starts: name -> (kimg, overrides beyond the ablation's CMT mid run, what it is). Run as
# digits_cmt.yaml with the authors' mid overrides and the ablation's mid budget.
MID_STARTS = {
    "cmt_l2mid": (9.6, ["mid.loss=l2"], "CMT with the squared L2 (summed, the authors' reduction)"),
    "kd_l2mid": (9.6, ["mid.method=kd", "mid.loss=l2"], "KD (equal pairs) with the squared L2"),
    "cmt_16x": (153.6, [], "CMT with the teacher NFEs of KD at equal pairs: 16x the pairs (153,600)"),
}


def start_dir(start: str, claims_runs: Path) -> Path:
    """The run dir of a mid-trained start: the ablation's (cmt, kd) or one of MID_STARTS."""
    return claims_runs / "diagnosis" / f"mid_{start}" if start in MID_STARTS else claims_runs / f"mid_{start}"


def start_overrides(start: str, claims_runs: Path, teacher: Path) -> list[str]:
    if start == "random":
        return ["post.init=random"]
    if start == "teacher":
        return ["post.init=teacher", f"post.init_from={teacher}"]
    return ["post.init=mid", f"post.init_from={start_dir(start, claims_runs)}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--claims-runs", type=Path, required=True, help="run dirs of benchmarks.claims --recipe authors")
    p.add_argument("--teacher", type=Path, required=True, help="the digits teacher's run dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)

    runs = args.claims_runs / "diagnosis"
    tasks = [Task(name, "post", "digits_ect.yaml", runs / name,
                  [*ARM, *start_overrides(start, args.claims_runs, args.teacher), f"train.total_kimg={kimg}", *extra],
                  (f"mid_{start}",) if start in MID_STARTS else ())
             for name, (start, kimg, extra, _) in VARIANTS.items() if name in args.variants]
    mid_arm = [*recipe_overrides("authors", "mid", AUTHORS_T_MID, AUTHORS_EMA_BETA["mid"]),
               f"mid.teacher={args.teacher}", "mid.method=cmt"]
    needed = {d for t in tasks for d in t.deps}
    mids = [Task(f"mid_{name}", "mid", "digits_cmt.yaml", start_dir(name, args.claims_runs),
                 [*mid_arm, f"train.total_kimg={kimg}", *extra]) for name, (kimg, extra, _) in MID_STARTS.items()
            if f"mid_{name}" in needed]
    run_tasks(mids + tasks, args.jobs, runs / "logs", args.threads)

    rows = []
    for task in tasks:
        start, _, extra, what = VARIANTS[task.name]
        scores = score_snapshots(task.run_dir, args.num_samples)
        if start not in ("teacher", "random"):     # the mid-trained start itself (same sampler), at kimg 0
            src = start_dir(start, args.claims_runs)
            scores.insert(0, {**_cached_score(src, src / "export", args.num_samples), "kimg": 0.0})
        rows += [{"variant": task.name, "start": start, "changes": " ".join(extra), "tests": what, **s}
                 for s in scores]
    write(rows, args.out)
    return 0


# The table's columns: the snapshot within 0.4 kimg of each (batch-512 snapshots fall on multiples of 0.512).
COLUMNS_KIMG = (0.0, 0.64, 3.2, 9.6, 19.2, 28.8, 38.4)


def write(rows: list[dict], out: Path) -> None:
    """variants.csv (every snapshot) and variants.md (one row per variant, the snapshots nearest COLUMNS_KIMG)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["variant", "start", "changes", "kimg", "fd_1step", "fd_2step", "tests"]
    with open(out / "variants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in keys})
    lines = ["fd_digits_cnn 1-step / 2-step, 1000 samples (benchmarks.claims scorer), EMA snapshots; each column is "
             "the snapshot within 0.4 kimg of it (batch 512 snapshots fall on multiples of 0.512).", "",
             "| variant | start | changes | " + " | ".join(f"{k:g}" for k in COLUMNS_KIMG) + " | best 1-step (kimg) | tests |",
             "|---" * (len(COLUMNS_KIMG) + 5) + "|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        cells = []
        for k in COLUMNS_KIMG:
            near = min(mine, key=lambda r: abs(r["kimg"] - k))
            cells.append(f"{near['fd_1step']:.2f} / {near['fd_2step']:.2f}" if abs(near["kimg"] - k) < 0.4 else "")
        best = min((r for r in mine if r["kimg"] > 0), key=lambda r: r["fd_1step"])
        lines.append(f"| {name} | {mine[0]['start']} | {mine[0]['changes'] or '-'} | " + " | ".join(cells)
                     + f" | {best['fd_1step']:.2f} ({best['kimg']:g}) | {mine[0]['tests']} |")
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'variants.csv'} and variants.md", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
