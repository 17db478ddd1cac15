"""The three-stage pipeline on one config family, end to end: pre -> mid (CMT) -> post, then results.

    python -m engine.demo --out runs/demo          # what `make demo` runs

Writes under --out: one run dir per stage (resumable: run the command again after an interruption),
and results/ with a PNG grid per stage and sampler, metrics.json (Fréchet distances beside the data
floor), and loss.png (one panel per stage).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TITLES = {"pre": "pre-training (teacher)", "mid": "mid-training (CMT)", "post": "post-training (ECT)"}


def run_stage(stage: str, config: Path, run_dir: Path, overrides: list[str]) -> Path:
    from engine.config import load_config
    from engine.trainer import Trainer

    cfg = load_config(config, overrides)
    return Trainer(cfg, stage, run_dir).fit()


def plot_stage_losses(run_dirs: dict[str, Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.plots import read_log

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4 * len(run_dirs), 3.2), dpi=120)
    for ax, (stage, run_dir) in zip(axes, run_dirs.items()):
        rows = read_log(run_dir)
        ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows])
        ax.set_title(TITLES.get(stage, stage))
        ax.set_xlabel("kimg")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--pre", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--mid", default=str(ROOT / "configs" / "digits_cmt.yaml"))
    p.add_argument("--post", default=str(ROOT / "configs" / "digits_ect.yaml"))
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--post-kimg", type=float, default=12.8,
                   help="post-training budget; short by default so the demo fits 20 minutes on 2 cores")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value in all three stages (repeatable)")
    args = p.parse_args(argv)

    from engine.config import ConfigError
    from engine.data import DataError
    from engine.evaluate import report
    from engine.export import load_exported
    from engine.build import model_kind
    from engine.sample import generate, save_grid

    out = Path(args.out)
    runs = {"pre": out / "pre", "mid": out / "mid", "post": out / "post"}
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    try:
        for stage, config, extra in (("pre", args.pre, []),
                                     ("mid", args.mid, [f"mid.teacher={runs['pre']}"]),
                                     ("post", args.post, [f"post.init_from={runs['mid']}",
                                                          f"train.total_kimg={args.post_kimg}"])):
            t = time.time()
            run_stage(stage, Path(config), runs[stage], [*args.overrides, *extra])
            timings[f"{stage}_train_seconds"] = round(time.time() - t, 1)
        metrics = {}
        for stage, run_dir in runs.items():
            cfg, net, meta = load_exported(run_dir)
            kind = model_kind(cfg, stage)
            step_counts = [cfg.sample.steps] if kind in ("edm", "flow") else [1, 2]
            for steps in step_counts:
                name = f"{stage}_{steps}step"
                save_grid(generate(net, cfg, kind, 100, seed=0, steps=steps), results / f"{name}.png")
                metrics[name] = report(net, cfg, meta, args.eval_samples, include_untrained=(stage == "pre"),
                                       steps=steps)
        metrics["timings"] = {**timings, "total_seconds": round(time.time() - t0, 1)}
        (results / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_stage_losses(runs, results / "loss.png")
    except (ConfigError, DataError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(metrics))
    print(f"results in {results}")
    return 0


def summary(metrics: dict) -> str:
    from engine.metrics import METRIC_NAME

    lines = [f"{'run':<14}{METRIC_NAME + '_297':>20}{'data floor':>12}"]
    for name, m in metrics.items():
        if name == "timings":
            continue
        lines.append(f"{name:<14}{m['model'].get(METRIC_NAME + '_297', float('nan')):>20.2f}"
                     f"{m['model'][METRIC_NAME + '_floor_297']:>12.2f}")
        if "untrained" in m:
            lines.append(f"{'untrained':<14}{m['untrained'].get(METRIC_NAME + '_297', float('nan')):>20.2f}")
    lines.append(f"total {metrics['timings']['total_seconds'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
