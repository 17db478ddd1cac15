"""Generate images from an exported network and save them as a PNG grid.

    cmt-sample --run-dir runs/demo/pre --steps 16 --out grid.png    # teacher: ODE solver
    cmt-sample --run-dir runs/demo/post --steps 2 --out grid.png    # flow map: 2 jumps
"""
from __future__ import annotations

import argparse
from engine.cli import entry_point
from engine.eval.generate import generate, save_grid
from engine.models.factory import model_kind
from engine.models.weights import load_exported


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a training run dir (or its export/ dir)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps for a teacher (default: sample.steps); jumps for a flow map (default 1)")
    p.add_argument("--solver", choices=["dpm_solver_pp", "heun", "euler"], default=None)
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None)
    p.add_argument("--num", type=int, default=None, help="number of images (default: sample.num_images)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg, net, meta = load_exported(args.run_dir)
    kind = model_kind(cfg, meta.get("stage", "pre"))
    images = generate(net, cfg, kind, args.num or cfg.sample.num_images, args.seed, args.solver,
                      args.steps, args.order)
    print(f"wrote {save_grid(images, args.out)} ({images.shape[0]} images, {meta.get('stage', '?')} "
          f"stage at {meta.get('kimg', '?')} kimg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
