"""Loss curves from a run's log.jsonl, as a PNG.

    python -m engine.plots --run-dir runs/demo/pre --out loss.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no log.jsonl in '{run_dir}': pass the --run-dir of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(runs: dict[str, list[dict]], out: str | Path, title: str = "training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, rows in runs.items():
        ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows], label=label)
    ax.set_xlabel("kimg (training images)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", action="append", required=True, help="repeat to overlay several runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        runs = {Path(d).name: read_log(d) for d in args.run_dir}
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {plot_losses(runs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
