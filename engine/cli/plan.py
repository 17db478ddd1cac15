"""Plan a run before renting GPUs: parameters, per-GPU memory under ZeRO 0-3, activations, FLOPs, GPU count.

    cmt-plan --config configs/paper/imagenet512_cmt.yaml --stage mid --gpus 8 --gpu-mem 80

engine/trainer/plan.py says how each figure is computed.
"""
from __future__ import annotations

from pathlib import Path

from engine.cli import CommandParser, entry_point
from engine.config import load_config
from engine.errors import ConfigError
from engine.trainer.plan import format_plan, plan


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--stage", default="mid", choices=["pre", "mid", "post"])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB of memory per GPU")
    p.add_argument("--batch", type=int, default=None, help="global batch (default train.batch_size)")
    p.add_argument("--teacher-config", default=None, help="the teacher's YAML when it differs from the student's")
    p.add_argument("--headroom", type=float, default=0.15, help="share of each GPU kept free (transients, context)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak reached")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.gpus < 1 or args.gpu_mem <= 0 or not 0 <= args.headroom < 1:
        raise ConfigError("--gpus and --gpu-mem must be positive and --headroom in [0, 1)")
    cfg = load_config(args.config, args.overrides)
    report = plan(cfg, args.stage, args.gpus, args.gpu_mem, args.batch, args.teacher_config, args.headroom,
                  args.gpu_tflops, args.mfu)
    print(format_plan(report, Path(args.config).name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
