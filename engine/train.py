"""Entry point for every stage: `python engine/train.py --stage pre --config configs/digits.yaml`.

Also runs under the DeepSpeed launcher (`deepspeed engine/train.py ...`), which adds --local_rank.
Starting again with the same --run-dir resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script: import the package from the repo root, not engine/ (whose modules would shadow).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["pre", "mid", "post"])
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/digits.yaml")
    p.add_argument("--run-dir", default=None, help="where checkpoints, exports and logs go (default runs/<name>-<stage>)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.total_kimg=50 train.seed=1 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.config import ConfigError, load_config
    from engine.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}-{args.stage}")
        from engine.trainer import Trainer

        export = Trainer(cfg, args.stage, run_dir).fit()
    except (ConfigError, DataError, NotImplementedError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: exported weights in {export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
