"""Train one stage: `cmt-train --stage pre --config configs/digits.yaml` (or `python engine/train.py ...`).

Also runs under the DeepSpeed launcher (`deepspeed engine/train.py ...`), which adds --local_rank.
Starting again with the same --run-dir resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli import CommandParser, entry_point
from engine.config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(description=__doc__)
    p.add_argument("--stage", required=True, choices=["pre", "mid", "post"])
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/digits.yaml")
    p.add_argument("--run-dir", default=None,
                   help="where checkpoints, exports and logs go (default runs/<name>-<stage>)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.total_kimg=50 train.seed=1 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def train(stage: str, config: str | Path, run_dir: str | Path | None = None, overrides=()) -> Path:
    """Train ``stage`` with the YAML ``config`` (plus ``overrides``) in ``run_dir``; returns the export dir."""
    from engine.trainer import Trainer   # DeepSpeed and the networks load only once the arguments are good

    cfg = load_config(config, list(overrides))
    return Trainer(cfg, stage, Path(run_dir or f"runs/{cfg.name}-{stage}")).fit()


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    export = train(args.stage, args.config, args.run_dir, args.overrides)
    print(f"done: exported weights in {export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
