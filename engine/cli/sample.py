"""Generate images from an exported network and save them as a PNG grid.

    cmt-sample --run-dir runs/demo/pre --steps 16 --out grid.png    # teacher: ODE solver
    cmt-sample --run-dir runs/demo/post --steps 2 --out grid.png    # flow map: 2 jumps
"""
from __future__ import annotations

from engine.cli import CommandParser, entry_point, positive
from engine.eval.generate import generate, save_grid
from engine.models.factory import model_kind
from engine.models.weights import load_exported


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--run-dir", required=True, help="a training run dir (or its export/ dir)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--steps", type=positive, default=None,
                   help="solver steps for a teacher (default: sample.steps); jumps for a flow map (default 1)")
    p.add_argument("--solver", choices=["dpm_solver_pp", "heun", "euler"], default=None)
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None)
    p.add_argument("--num", type=positive, default=None, help="number of images (default: sample.num_images)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg, net, meta = load_exported(args.run_dir)
    kind = model_kind(cfg, meta.get("stage", "pre"))
    num = cfg.sample.num_images if args.num is None else args.num
    images = generate(net, cfg, kind, num, args.seed, args.solver, args.steps, args.order)
    print(f"wrote {save_grid(images, args.out)} ({images.shape[0]} images, {meta.get('stage', '?')} "
          f"stage at {meta.get('kimg', '?')} kimg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
