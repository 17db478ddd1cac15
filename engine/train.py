"""The documented way to launch a stage, on one process or many:

    python engine/train.py --stage pre --config configs/digits.yaml
    deepspeed --num_gpus 8 engine/train.py --stage mid --config configs/paper/cifar10_cmt.yaml --set mid.teacher=T

The same as ``cmt-train`` / ``python -m engine.cli.train`` (engine/cli/train.py has the options). Starting
again with the same --run-dir resumes from the last checkpoint.
"""
import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script, Python puts engine/ first on sys.path: import the package from the repo root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from engine.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
