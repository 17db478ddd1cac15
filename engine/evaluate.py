"""``python -m engine.evaluate``: the same as ``cmt-evaluate`` (engine/cli/evaluate.py has the options;
docs/evaluation.md the protocol), e.g. ``python -m engine.evaluate ref --data DATASET --out stats.npz``."""
from engine.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
