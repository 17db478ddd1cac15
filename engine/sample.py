"""Generate images from an exported network and save them as a PNG grid.

    python -m engine.sample --run-dir runs/demo/pre --steps 16 --out grid.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from engine.config import Config, ConfigError
from engine.grids import edm_lambda_uniform_sigmas, fm_uniform_times, karras_sigmas
from engine.networks.precond import EDMDenoiser, FlowVelocity
from engine.solvers import dpm_solver_pp, edm_euler, edm_heun, fm_euler, fm_heun


@torch.no_grad()
def generate_teacher(net: torch.nn.Module, cfg: Config, num: int, seed: int, solver: str | None = None,
                     steps: int | None = None, order: int | None = None, batch_size: int | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Samples [num, C, H, W] from a diffusion network by solving its ODE (defaults from cfg.sample)."""
    solver = solver or cfg.sample.solver
    steps = steps or cfg.sample.steps
    order = order or cfg.sample.order
    batch_size = batch_size or cfg.sample.batch_size
    m = cfg.model
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen)   # drawn at once: the images do not depend on batch_size
    labels = None
    if cfg.network.num_classes > 0:
        labels = torch.randint(0, cfg.network.num_classes, (num,), generator=gen)
    out = []
    for lo in range(0, num, batch_size):
        eps = noise[lo:lo + batch_size].to(device)
        lab = None if labels is None else labels[lo:lo + batch_size].to(device)
        if m.kind == "edm":
            den = EDMDenoiser(net, sigma_data=m.sigma_data).eval()
            fn = lambda x, s: den(x, s, lab)  # noqa: E731
            if solver == "dpm_solver_pp":
                sig = edm_lambda_uniform_sigmas(steps, m.sigma_min, m.sigma_max).to(device)
                states = dpm_solver_pp(fn, eps * m.sigma_max, sig, order=order)
            else:
                sig = karras_sigmas(steps, m.sigma_min, m.sigma_max).to(device)
                states = (edm_heun if solver == "heun" else edm_euler)(fn, eps * m.sigma_max, sig)
        else:
            if solver == "dpm_solver_pp":
                raise ConfigError("sample.solver=dpm_solver_pp needs model.kind=edm; use heun or euler "
                                  "for a flow-matching model")
            vel = FlowVelocity(net).eval()
            times = fm_uniform_times(steps).to(device)
            states = (fm_heun if solver == "heun" else fm_euler)(lambda z, t: vel(z, t, lab), eps, times)
        out.append(states[-1].float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, min_size: int = 512) -> Path:
    """Save images in [-1, 1] as a near-square grid, upscaled (nearest) so small images stay legible."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images.clamp(-1, 1)):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    scale = max(1, math.ceil(min_size / max(grid.shape[1:])))
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a training run dir (or its export/ dir)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the run's sample.steps)")
    p.add_argument("--solver", choices=["dpm_solver_pp", "heun", "euler"], default=None)
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None)
    p.add_argument("--num", type=int, default=None, help="number of images (default: sample.num_images)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from engine.export import load_exported

    try:
        cfg, net, meta = load_exported(args.run_dir)
        images = generate_teacher(net, cfg, args.num or cfg.sample.num_images, args.seed, args.solver,
                                  args.steps, args.order)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {save_grid(images, args.out)} ({images.shape[0]} images, {meta.get('stage', '?')} "
          f"stage at {meta.get('kimg', '?')} kimg)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
