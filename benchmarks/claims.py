"""The paper's initialisation claim at small scale, for consistency models and for MeanFlow.

    python -m benchmarks.claims --teacher runs/teacher --out benchmarks/results/claims
    python -m benchmarks.claims --form meanflow --teacher runs/fm-teacher --out benchmarks/results/claims_meanflow
    python -m benchmarks.claims --teacher runs/teacher --out benchmarks/results/claims_authors \\
        --recipe authors --post ect ecd --kd-equal-compute --control-recipe engine --long-arms 2

Consistency form: ECT post-training (configs/digits_ect.yaml) from CMT, KD, teacher and random init, plus
Slow CMT run only long enough to measure its cost. MeanFlow form: MeanFlow post-training
(configs/digits_meanflow.yaml) from MeanFlow-CMT (configs/digits_mf_cmt.yaml), the flow-matching teacher
and random init. Every arm post-trains with the same config (constant lr, as in the paper's ablation)
for the same number of images; EMA snapshots are scored with 1- and 2-step sampling as training goes.
Mid-training arms get the same mid budget; their cost (teacher NFEs per pair, counted by the engine,
and seconds per kimg) is measured in the same run. Writes curves.csv, mid_cost.csv, claims.png and
summary.json; reruns reuse finished run dirs (and the scores they cached in claims_scores.json).

Options beyond that default (consistency form):
  --recipe authors     the authors' code as switches (docs/deviations.md): EDM coefficients in training,
                       eval σ_min 0.003, re-noise std τ, unclamped ECT/ECD t, constant EMA (β per stage:
                       --mid-ema-beta / --post-ema-beta), summed l2; 2-step t_mid --t-mid (0.821).
  --post ect ecd       post-train every init with each method (ECD distils --teacher, Heun step).
  --kd-equal-compute   a KD arm with the teacher NFEs of the CMT arm (the measured NFE-per-pair ratio, so
                       1/16 of the pairs on the digits), beside KD at equal pairs.
  --control-recipe R   the CMT arm (mid + every post method) again with recipe R, on the same teacher.
  --long-arms N        the N post arms with the best final 1-step score, continued to --long-kimg
                       (constant lr, so a continuation is the same run as a longer one).
  --score-start        also score each mid-trained start (post kimg 0) with the post arms' sampler.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
# Per form: mid config, post config, the mid-training methods (init arms besides teacher and random),
# and the post-training method's name for the plot.
FORMS = {
    "consistency": {"mid": "digits_cmt.yaml", "post": "digits_ect.yaml", "mid_methods": ("cmt", "kd"),
                    "cost_only": ("slow_cmt",), "title": "ECT"},
    "meanflow": {"mid": "digits_mf_cmt.yaml", "post": "digits_meanflow.yaml", "mid_methods": ("cmt",),
                 "cost_only": (), "title": "MeanFlow"},
}

# The authors' code as config switches (docs/deviations.md, "The authors' code, as switches"), per stage.
# The EMA's beta is set apart (recipe_overrides): a constant beta means something else over ~100 steps.
RECIPES = {
    "engine": {"both": (), "mid": (), "post": ()},
    "authors": {"both": ("model.train_coeffs=edm", "model.eval_sigma_min=0.003", "sample.renoise_std=tau",
                         "train.ema_warmup=false"),
                "mid": ("mid.l2_reduction=sum",),
                "post": ("post.clamp_t=false",)},
}
# The authors' ECT post-trained models were evaluated 2-step at t_mid 0.821 (CIFAR-10's, the same EDM σ range).
AUTHORS_T_MID = 0.821
# Constant EMA betas for --recipe authors, chosen to keep the authors' EMA half-life as a share of the run:
# CMT 0.999 over 38.4 Mimg / 128 = 300k steps is a half-life of 0.23% of the run (< 1 of our ~100 steps: no
# EMA); ECT 0.9999 over 12.8 Mimg / 128 = 100k steps is 6.9% (0.9: 6.6 of our ~75-100 steps). The paper's
# betas themselves would leave a 75-step run's EMA 93% (0.999) or 99% (0.9999) its initial weights.
AUTHORS_EMA_BETA = {"mid": 0.0, "post": 0.9}


def recipe_overrides(recipe: str, stage: str, t_mid: float | None = None, ema_beta: float | None = None) -> list[str]:
    """The --set overrides of `recipe` for `stage` ("mid" or "post"), plus t_mid and the EMA beta if given."""
    r = RECIPES[recipe]
    over = [*r["both"], *r[stage]]
    if t_mid is not None:
        over.append(f"sample.t_mid={t_mid}")
    if ema_beta is not None:
        over.append(f"train.ema_beta={ema_beta}")
    return over


def arm_name(method: str, init: str, methods: list[str], recipe_prefix: str = "") -> str:
    """A post arm's name: the init alone when ECT is the only method (the default's names), else method_init;
    arms of the control recipe are prefixed with it."""
    base = init if list(methods) == ["ect"] and not recipe_prefix else f"{method}_{init}"
    return f"{recipe_prefix}_{base}" if recipe_prefix else base


def plan_post_arms(methods: list[str], inits: list[str], control_recipe: str | None = None) -> list[dict]:
    """Every post arm: each method from each init, then each method from the control recipe's CMT."""
    arms = [{"name": arm_name(m, i, methods), "method": m, "init": i, "recipe": "primary"}
            for m in methods for i in inits]
    if control_recipe:
        arms += [{"name": arm_name(m, "cmt", methods, control_recipe), "method": m, "init": "cmt",
                  "recipe": control_recipe} for m in methods]
    return arms


def equal_compute_kimg(mid_kimg: float, cmt_nfe_per_pair: float, kd_nfe_per_pair: float, batch: int) -> float:
    """KD's pair budget with the teacher NFEs of `mid_kimg` of CMT pairs, in whole batches (at least one)."""
    pairs = mid_kimg * 1000 * cmt_nfe_per_pair / kd_nfe_per_pair
    return max(1, math.floor(pairs / batch)) * batch / 1000


def pick_long_arms(final: dict[str, dict], n: int) -> list[str]:
    """The n arms with the lowest final 1-step score (ties: 2-step), best first."""
    return sorted(final, key=lambda a: (final[a]["fd_1step"], final[a]["fd_2step"]))[:max(0, n)]


def train(stage: str, config: str, run_dir: Path, overrides: list[str]) -> float:
    """Train (or resume / reuse) `run_dir` in this process; returns the seconds this call took."""
    from engine.cli.train import train as train_stage

    t0 = time.time()
    train_stage(stage, ROOT / "configs" / config, run_dir, ["train.progress=false", *overrides])
    return time.time() - t0


@dataclass
class Task:
    """One training run: `overrides` may be a function, called when the task starts (after its deps)."""
    name: str
    stage: str
    config: str
    run_dir: Path
    overrides: list[str] | Callable[[], list[str]]
    deps: tuple[str, ...] = ()
    then: Callable[[], None] | None = None      # called in this process once the run is done (e.g. scoring)


def finished(run_dir: Path, overrides: list[str]) -> bool:
    """Whether run_dir already exported at the train.total_kimg these overrides ask for (nothing left to train)."""
    meta, total = run_dir / "export" / "meta.json", [o for o in overrides if o.startswith("train.total_kimg=")]
    if not meta.is_file() or not total:
        return False
    return round(json.loads(meta.read_text())["kimg"] * 1000) >= round(float(total[-1].split("=", 1)[1]) * 1000)


def next_ready(pending: list[Task], done: set[str]) -> Task | None:
    """The first pending task whose deps are all done (list order is the order of a serial run)."""
    return next((t for t in pending if all(d in done for d in t.deps)), None)


def run_tasks(tasks: list[Task], jobs: int, log_dir: Path, threads: int = 0) -> dict[str, float]:
    """Run `tasks` respecting their deps: in this process when jobs == 1, else up to `jobs` subprocesses at once
    (each with `threads` torch threads; its output in log_dir/<name>.log). Returns each task's seconds."""
    pending, running, done, wall, last_start = list(tasks), {}, set(), {}, 0.0
    while pending or running:
        while len(running) < max(1, jobs) and (task := next_ready(pending, done)) is not None:
            pending.remove(task)
            over = task.overrides() if callable(task.overrides) else task.overrides
            if jobs > 1 and finished(task.run_dir, over):    # a rerun: no subprocess start-up for a finished run
                done.add(task.name)
                if task.then:
                    task.then()
                continue
            if jobs <= 1:
                wall[task.name] = train(task.stage, task.config, task.run_dir, over)
                done.add(task.name)
                if task.then:
                    task.then()
                continue
            log_dir.mkdir(parents=True, exist_ok=True)
            time.sleep(max(0.0, last_start + 5.0 - time.time()))   # starting two at the same moment once hung
            last_start = time.time()
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                                      if threads else {}))
            log = open(log_dir / f"{task.name}.log", "w")
            cmd = [sys.executable, "-m", "engine.cli.train", "--stage", task.stage, "--config",
                   str(ROOT / "configs" / task.config), "--run-dir", str(task.run_dir), "--set",
                   "train.progress=false", *over]
            running[task.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), task,
                                  time.time(), log)
            print(f"started {task.name}", file=sys.stderr)
        if not running and pending and next_ready(pending, done) is None:
            raise RuntimeError(f"tasks with unmet deps: {[t.name for t in pending]}")
        for name, (proc, task, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other in running.values():
                    other[0].terminate()
                tail = (log_dir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{tail}")
            wall[name] = time.time() - t0
            done.add(name)
            print(f"done {name} ({wall[name]:.0f} s)", file=sys.stderr)
            if task.then:
                task.then()
        if running:
            time.sleep(1.0)
    return wall


def _score(export_dir: Path, num_samples: int, steps=(1, 2), t_mid: float | None = None) -> dict:
    """fd_digits_cnn of an export at each step count (2-step at ``t_mid`` if given, else its config's)."""
    from engine.eval.frechet import METRIC_NAME
    from engine.eval.report import report
    from engine.models.weights import load_exported

    cfg, net, meta = load_exported(export_dir)
    if t_mid is not None:
        cfg.sample.t_mid = t_mid
    row = {"kimg": meta["kimg"]}
    for n in steps:
        row[f"fd_{n}step"] = report(net, cfg, meta, num_samples, include_untrained=False, steps=n)["model"][METRIC_NAME]
    return row


def cached(cache_file: Path, key: str, compute: Callable[[], object]):
    """compute(), kept in the JSON file cache_file under key (reruns do not recompute)."""
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        cache[key] = compute()
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache[key]


def _cached_score(run_dir: Path, export_dir: Path, num_samples: int) -> dict:
    """_score, cached in run_dir/claims_scores.json by export dir and sample count (reruns do not rescore)."""
    return cached(run_dir / "claims_scores.json", f"{export_dir.relative_to(run_dir).as_posix()}@{num_samples}",
                  lambda: _score(export_dir, num_samples))


def score_snapshots(run_dir: Path, num_samples: int) -> list[dict]:
    return [_cached_score(run_dir, snap, num_samples) for snap in sorted((run_dir / "snapshots").glob("kimg-*"))]


def run_setting(run_dir: Path, section: str, key: str):
    """One value of the config a run dir trained with (its config.yaml), e.g. the post loss of an arm."""
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())[section][key]


def mid_cost(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]     # not the score rows
    last = rows[-1]
    steady = rows[1:] or rows   # the first interval includes start-up
    return {"teacher_nfe_per_pair": last["teacher_nfe"] / last["pairs"],
            "sec_per_kimg": sum(r["sec_per_kimg"] for r in steady) / len(steady),
            "teacher_nfe_total": last["teacher_nfe"], "pairs": last["pairs"]}


def plot(curves: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6) if len(curves) <= 6 else (12, 5), dpi=120)
    colours = plt.get_cmap("tab20").colors if len(curves) > 10 else [None] * len(curves)
    for ax, steps in zip(axes, (1, 2)):
        for (init, rows), colour in zip(curves.items(), colours):
            style = "--" if init.startswith("ecd") or "_ecd_" in init else "-"
            ax.plot([r["kimg"] for r in rows], [r[f"fd_{steps}step"] for r in rows], style, marker="o", ms=3,
                    color=colour, label=init if len(curves) > 6 else f"{init} init")
        ax.set_title(f"{title} post-training, {steps}-step sampling")
        ax.set_xlabel("post-training kimg")
        ax.set_ylabel("fd_digits_cnn (1000 samples)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7 if len(curves) > 6 else None, ncol=2 if len(curves) > 6 else 1)
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
    p.add_argument("--slow-cmt-kimg", type=float, default=2.56, help="0: no Slow CMT cost run")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="engine")
    p.add_argument("--t-mid", type=float, default=None, help="2-step t_mid (default: the config's; authors: 0.821)")
    p.add_argument("--mid-ema-beta", type=float, default=None, help="default: the config's; authors: 0")
    p.add_argument("--post-ema-beta", type=float, default=None, help="default: the config's; authors: 0.9")
    p.add_argument("--post", nargs="+", choices=("ect", "ecd"), default=None,
                   help="consistency post-training methods (default ect)")
    p.add_argument("--kd-equal-compute", action="store_true")
    p.add_argument("--control-recipe", choices=sorted(RECIPES), default=None)
    p.add_argument("--long-arms", type=int, default=0)
    p.add_argument("--long-kimg", type=float, default=None, help="default 3x --post-kimg")
    p.add_argument("--long-snapshot-kimg", type=float, default=None, help="default 2x --snapshot-kimg")
    p.add_argument("--score-start", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of this process and of each --jobs worker (0: leave torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each in a subprocess (1: in line)")
    p.add_argument("--skip-arms", nargs="+", default=[], metavar="NAME", help="post arms not to run (e.g. ecd_random)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra post arm from CMT with these overrides (init=/method= pick another init/method)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    form = FORMS[args.form]
    methods = args.post or ["ect"]
    if args.form == "meanflow" and (args.post or args.kd_equal_compute or args.recipe != "engine"
                                    or args.control_recipe):
        p.error("--post / --kd-equal-compute / --recipe / --control-recipe are for --form consistency")
    out = Path(args.out or f"benchmarks/results/claims{'' if args.form == 'consistency' else '_' + args.form}")
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher)
    t_start = time.time()
    log_dir = out / "logs"

    def settings(recipe: str, stage: str, primary: bool = True) -> list[str]:
        """The recipe's overrides; --t-mid and the --*-ema-beta options apply to the primary recipe only."""
        beta = (args.mid_ema_beta if stage == "mid" else args.post_ema_beta) if primary else None
        t_mid = args.t_mid if primary else None
        if recipe == "engine":
            return recipe_overrides("engine", stage, t_mid, beta)
        return recipe_overrides(recipe, stage, AUTHORS_T_MID if t_mid is None else t_mid,
                                AUTHORS_EMA_BETA[stage] if beta is None else beta)

    def mid_task(name: str, method: str, kimg, recipe: str, primary=True, extra=(), deps=()) -> Task:
        def over():
            k = kimg() if callable(kimg) else kimg
            return [f"mid.teacher={teacher}", f"mid.method={method}", f"train.total_kimg={k}",
                    *settings(recipe, "mid", primary), *(extra(k) if callable(extra) else extra)]
        return Task(f"mid_{name}", "mid", form["mid"], out / f"mid_{name}", over, tuple(deps))

    # Mid-training: each method, the cost-only runs, KD at CMT's teacher NFEs, the control recipe's CMT.
    mids = {m: out / f"mid_{m}" for m in form["mid_methods"]}
    tasks = [mid_task(m, m, args.mid_kimg, args.recipe) for m in form["mid_methods"]]
    cost_runs = dict(mids)
    for method in (form["cost_only"] if args.slow_cmt_kimg > 0 else ()):
        cost_runs[method] = out / f"mid_{method}"
        tasks.append(mid_task(method, method, args.slow_cmt_kimg, args.recipe, extra=["train.log_every_kimg=0.64"]))
    eqc: dict[str, float] = {}
    if args.kd_equal_compute:
        from engine.config import load_config

        batch = load_config(ROOT / "configs" / form["mid"], []).train.batch_size

        def eqc_kimg() -> float:     # from the NFEs per pair the engine counted in the CMT and KD runs
            eqc["kimg"] = equal_compute_kimg(args.mid_kimg, mid_cost(mids["cmt"])["teacher_nfe_per_pair"],
                                             mid_cost(mids["kd"])["teacher_nfe_per_pair"], batch)
            return eqc["kimg"]
        mids["kd_eqc"] = cost_runs["kd_eqc"] = out / "mid_kd_eqc"
        tasks.append(mid_task("kd_eqc", "kd", eqc_kimg, args.recipe, deps=("mid_cmt", "mid_kd"),
                              extra=lambda k: [f"train.log_every_kimg={k}", f"train.checkpoint_every_kimg={k}"]))
    control_mid = None
    if args.control_recipe:
        control_mid = cost_runs[f"{args.control_recipe}_cmt"] = out / f"mid_{args.control_recipe}_cmt"
        tasks.append(mid_task(f"{args.control_recipe}_cmt", "cmt", args.mid_kimg, args.control_recipe, primary=False))

    # Post-training arms, then the --variant arms (the CMT init with extra overrides).
    init_from = {**{m: ("mid", d) for m, d in mids.items()}, "teacher": ("teacher", teacher), "random": ("random", None)}
    arms = plan_post_arms(methods, list(init_from), args.control_recipe) if args.form == "consistency" else \
        [{"name": i, "method": None, "init": i, "recipe": "primary"} for i in init_from]
    arms = [a for a in arms if a["name"] not in args.skip_arms]
    for spec in args.variant:
        vname, _, rest = spec.partition(":")
        keys = [kv for kv in rest.split(",") if kv]
        opts = dict(kv.split("=", 1) for kv in keys if kv.split("=", 1)[0] in ("init", "method"))
        init, method = opts.get("init", "cmt"), opts.get("method", methods[0])
        arms.append({"name": f"{arm_name(method, init, methods)}_{vname}", "method": method, "init": init,
                     "recipe": "primary", "extra": [kv for kv in keys if kv.split("=", 1)[0] not in opts]})

    def source(arm: dict) -> tuple[str, Path | None]:
        return ("mid", control_mid) if arm["recipe"] != "primary" else init_from[arm["init"]]

    def post_over(arm: dict) -> list[str]:
        kind, src = source(arm)
        over = [f"post.init={kind}", "optim.schedule=constant", f"train.total_kimg={args.post_kimg}",
                f"train.snapshot_every_kimg={args.snapshot_kimg}",
                *settings(args.recipe if arm["recipe"] == "primary" else arm["recipe"], "post",
                          arm["recipe"] == "primary")]
        if arm["method"] is not None and arm["method"] != "ect":
            over += [f"post.method={arm['method']}", f"post.teacher={teacher}"]
        if src is not None:
            over.append(f"post.init_from={src}")
        return over + list(arm.get("extra", ()))

    curves, starts = {}, {}

    def scorer(arm: dict, run_dir: Path) -> Callable[[], None]:
        def score():
            curves[arm["name"]] = score_snapshots(run_dir, args.num_samples)
            kind, src = source(arm)
            if args.score_start and kind == "mid" and src is not None:
                starts[arm["name"]] = {**_cached_score(src, src / "export", args.num_samples), "kimg": 0.0}
            print(f"{arm['name']}: start {starts.get(arm['name'])} final {curves[arm['name']][-1]}", file=sys.stderr)
        return score

    for arm in arms:
        kind, src = source(arm)
        deps = (src.name,) if kind == "mid" else ()     # the mid task is named as its run dir
        run_dir = out / f"post_{arm['name']}"
        tasks.append(Task(f"post_{arm['name']}", "post", form["post"], run_dir, post_over(arm), deps,
                          scorer(arm, run_dir)))
    wall = run_tasks(tasks, args.jobs, log_dir, args.threads)
    cost = {m: mid_cost(d) for m, d in cost_runs.items()}

    # The long arms: the best short arms (no variants) continued; constant lr, so the same as a longer run.
    long_arms = pick_long_arms({a["name"]: curves[a["name"]][-1] for a in arms if "extra" not in a}, args.long_arms)
    long_kimg = args.long_kimg or 3 * args.post_kimg
    long_tasks = []
    for name in long_arms:
        arm = next(a for a in arms if a["name"] == name)
        short_dir, long_dir = out / f"post_{name}", out / f"post_{name}_long"
        if not long_dir.exists():
            shutil.copytree(short_dir, long_dir, ignore=shutil.ignore_patterns("run.lock"))
        over = [o for o in post_over(arm) if not o.startswith(("train.total_kimg=", "train.snapshot_every_kimg="))]
        long_arm = {**arm, "name": f"{name}_long"}
        long_tasks.append(Task(f"post_{name}_long", "post", form["post"], long_dir,
                               [*over, f"train.total_kimg={long_kimg}", "train.snapshot_every_kimg="
                                f"{args.long_snapshot_kimg or 2 * args.snapshot_kimg}"], (), scorer(long_arm, long_dir)))
        arms.append(long_arm)
    wall.update(run_tasks(long_tasks, args.jobs, log_dir, args.threads))
    curves = {a["name"]: curves[a["name"]] for a in arms}     # in plan order, whichever run finished first

    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["init", "post_kimg", "fd_1step", "fd_2step"])
        for init, rows in curves.items():
            for r in ([starts[init]] if init in starts else []) + rows:
                w.writerow([init, r["kimg"], f"{r['fd_1step']:.4f}", f"{r['fd_2step']:.4f}"])
    with open(out / "mid_cost.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mid_method", "teacher_nfe_per_pair", "sec_per_kimg", "time_vs_cmt"])
        for m, c in cost.items():
            w.writerow([m, f"{c['teacher_nfe_per_pair']:.3f}", f"{c['sec_per_kimg']:.2f}",
                        f"{c['sec_per_kimg'] / cost['cmt']['sec_per_kimg']:.2f}"])
    plot({a: ([starts[a]] if a in starts else []) + c for a, c in curves.items()}, out / "claims.png",
         form["title"] if methods == ["ect"] else "/".join(m.upper() for m in methods))

    summary = {"form": args.form, "mid_cost": cost, "final": {i: rows[-1] for i, rows in curves.items()}}
    for steps in (1, 2):
        key = f"fd_{steps}step"
        for method in methods if args.form == "consistency" else [None]:
            name = (lambda init: arm_name(method, init, methods)) if method else (lambda init: init)
            tag = "" if method is None or methods == ["ect"] else f"{method}_"
            goal = curves[name("teacher")][-1][key]
            reach = next((r["kimg"] for r in curves[name("cmt")] if r[key] <= goal), None)
            summary[f"{tag}cmt_kimg_to_reach_teacher_init_final_{steps}step"] = reach
            summary[f"{tag}claim_cmt_under_half_{steps}step"] = reach is not None and reach < args.post_kimg / 2
            if name("kd") in curves:
                summary[f"{tag}claim_kd_worse_than_cmt_{steps}step"] = \
                    curves[name("kd")][-1][key] > curves[name("cmt")][-1][key]
            if name("kd_eqc") in curves:
                summary[f"{tag}claim_kd_equal_compute_worse_than_cmt_{steps}step"] = \
                    curves[name("kd_eqc")][-1][key] > curves[name("cmt")][-1][key]
    if starts:
        summary["start"] = starts
        summary["post_improves_start"] = {
            a: {f"{s}step": curves[a][-1][f"fd_{s}step"] < starts[a][f"fd_{s}step"] for s in (1, 2)} for a in starts}
    if args.form == "consistency" and (args.recipe != "engine" or args.post or args.kd_equal_compute
                                       or args.control_recipe or args.long_arms or args.variant):
        summary["settings"] = {
            "recipe": args.recipe, "control_recipe": args.control_recipe, "post_methods": methods,
            "mid_kimg": args.mid_kimg, "post_kimg": args.post_kimg, "snapshot_kimg": args.snapshot_kimg,
            "kd_equal_compute_kimg": eqc.get("kimg"), "jobs": args.jobs, "long_arms": long_arms, "long_kimg": long_kimg if long_arms else None,
            "num_samples": args.num_samples, "threads": args.threads or None,
            "mid_overrides": settings(args.recipe, "mid"), "post_overrides": settings(args.recipe, "post"),
            "control_post_overrides": settings(args.control_recipe, "post", False) if args.control_recipe else None,
            "variants": {a["name"]: a["extra"] for a in arms if "extra" in a}}
        summary["arms"] = {a["name"]: {"method": a["method"], "init": a["init"],
                                       "recipe": args.recipe if a["recipe"] == "primary" else a["recipe"],
                                       "post_loss": run_setting(out / f"post_{a['name']}", "post", "loss"),
                                       "start": starts.get(a["name"]), "final": curves[a["name"]][-1],
                                       "best_1step": min(r["fd_1step"] for r in curves[a["name"]]),
                                       "best_2step": min(r["fd_2step"] for r in curves[a["name"]])} for a in arms}
        summary["wall_seconds_this_invocation"] = {**{k: round(v, 1) for k, v in wall.items()},
                                                   "total": round(time.time() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
