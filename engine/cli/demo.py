"""The three-stage pipeline on one config family, end to end: pre -> mid (CMT) -> post, then results.

    cmt-demo --out runs/demo          # what `make demo` runs

Writes under --out: one run dir per stage (resumable: run the command again after an interruption),
and results/ with a PNG grid per stage and sampler, metrics.json (Fréchet distances beside the data
floor), and loss.png (one panel per stage).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from engine.cli import CommandParser, entry_point
from engine.cli.train import train
from engine.eval.frechet import METRIC_NAME
from engine.eval.generate import generate, save_grid
from engine.eval.plots import plot_losses, read_log
from engine.eval.report import report
from engine.models.factory import model_kind
from engine.models.weights import load_exported

ROOT = Path(__file__).resolve().parents[2]
TITLES = {"pre": "pre-training (teacher)", "mid": "mid-training (CMT)", "post": "post-training (ECT)"}


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
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
    out = Path(args.out)
    runs = {"pre": out / "pre", "mid": out / "mid", "post": out / "post"}
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    for stage, config, extra in (("pre", args.pre, []),
                                 ("mid", args.mid, [f"mid.teacher={runs['pre']}"]),
                                 ("post", args.post, [f"post.init_from={runs['mid']}",
                                                      f"train.total_kimg={args.post_kimg}"])):
        t = time.time()
        train(stage, config, runs[stage], [*args.overrides, *extra])
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
    plot_losses({TITLES[stage]: {stage: read_log(run_dir)} for stage, run_dir in runs.items()},
                results / "loss.png")
    print(summary(metrics))
    print(f"results in {results}")
    return 0


def summary(metrics: dict) -> str:
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
    raise SystemExit(main())
