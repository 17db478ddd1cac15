"""Loss curves from runs' log.jsonl files, as a PNG: one panel per group of runs."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import MissingFileError


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise MissingFileError(f"no log.jsonl in '{run_dir}': pass the --run-dir of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(panels: dict[str, dict[str, list[dict]]], out: str | Path) -> Path:
    """``{panel title: {run label: log rows}}`` as side-by-side log-scale loss-over-kimg panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.0 * len(panels)), 3.6), dpi=120, squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for label, rows in runs.items():
            rows = [r for r in rows if "loss" in r]     # score rows (train.eval_every_kimg) have none
            ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows], label=label)
        ax.set_title(title)
        ax.set_xlabel("kimg (training images)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
