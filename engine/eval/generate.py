"""Images from an exported network: a teacher's ODE solve, or a flow map's one or two jumps, and PNG grids."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.config import Config
from engine.errors import ConfigError
from engine.formulas.grids import edm_lambda_uniform_sigmas, fm_uniform_times, karras_sigmas
from engine.models.factory import wrap_network
from engine.sampling.fewstep import consistency_sample, meanflow_sample
from engine.sampling.solvers import dpm_solver_pp, edm_euler, edm_heun, fm_euler, fm_heun


def _teacher_states(model, kind: str, cfg: Config, eps, labels, solver: str, steps: int, order: int) -> list:
    m = cfg.model
    if kind == "edm":
        fn = lambda x, s: model(x, s, labels)  # noqa: E731
        if solver == "dpm_solver_pp":
            sigmas = edm_lambda_uniform_sigmas(steps, m.sigma_min, m.sigma_max).to(eps.device)
            return dpm_solver_pp(fn, eps * m.sigma_max, sigmas, order=order)
        sigmas = karras_sigmas(steps, m.sigma_min, m.sigma_max).to(eps.device)
        return (edm_heun if solver == "heun" else edm_euler)(fn, eps * m.sigma_max, sigmas)
    if solver == "dpm_solver_pp":
        raise ConfigError("sample.solver=dpm_solver_pp needs model.kind=edm; use heun or euler for a "
                          "flow-matching model")
    times = fm_uniform_times(steps).to(eps.device)
    return (fm_heun if solver == "heun" else fm_euler)(lambda z, t: model(z, t, labels), eps, times)


def sampler_settings(cfg: Config, kind: str, solver: str | None = None, steps: int | None = None,
                     order: int | None = None) -> dict:
    """What draws the samples, defaults filled in: teachers ('edm', 'flow') solve their ODE (cfg.sample),
    flow maps ('consistency', 'meanflow') take `steps` jumps (default 1; a consistency model 1 or 2)."""
    teacher = kind in ("edm", "flow")
    steps = steps if steps is not None else (cfg.sample.steps if teacher else 1)
    if steps < 1 or (kind == "consistency" and steps > 2):
        raise ConfigError(f"{steps} sampling steps for a '{kind}' network: teachers and MeanFlow take 1 or more, a "
                          "consistency model 1 or 2 (it re-noises to sample.t_mid between them)")
    out = {"kind": kind, "steps": steps}
    if teacher:
        out.update(solver=solver or cfg.sample.solver, order=order or cfg.sample.order)
    if kind == "consistency" and steps == 2:     # a 2-step score depends on where it re-noises, and how
        out.update(t_mid=cfg.sample.t_mid, renoise_std=cfg.sample.renoise_std)
    return out


def sample_batch(model, cfg: Config, sampler: dict, eps: torch.Tensor, labels, renoise=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One batch of samples from unit noise `eps` (and `labels`) with a wrapped model (wrap_network).
    A 2-step consistency model re-noises with `renoise` (each image's own) or draws from `generator`."""
    kind, steps = sampler["kind"], sampler["steps"]
    if kind in ("edm", "flow"):
        states = _teacher_states(model, kind, cfg, eps, labels, sampler["solver"], steps, sampler["order"])
    elif kind == "consistency":
        states = consistency_sample(lambda x, s: model(x, s, labels), eps, cfg.model.sigma_max, steps,
                                    cfg.sample.t_mid, cfg.model.sigma_min, generator=generator, renoise=renoise,
                                    renoise_std=cfg.sample.renoise_std)
    else:
        states = meanflow_sample(lambda z, r, t: model(z, r, t, labels), eps, steps)
    return states[-1].float()


@torch.no_grad()
def generate(net: torch.nn.Module, cfg: Config, kind: str, num: int, seed: int, solver: str | None = None,
             steps: int | None = None, order: int | None = None, batch_size: int | None = None,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Samples [num, C, H, W] from a raw network used as `kind` (engine.models.factory.model_kind), with
    the sampler of :func:`sampler_settings`. The noise is drawn at once from `seed`, so the images do not
    depend on batch_size (engine/eval/protocol.py draws each image from its own seed instead)."""
    sampler = sampler_settings(cfg, kind, solver, steps, order)
    batch_size = batch_size or cfg.sample.batch_size
    model = wrap_network(net, cfg, kind).eval()
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen)
    labels = torch.randint(0, cfg.network.num_classes, (num,), generator=gen) if cfg.network.num_classes > 0 else None
    out = []
    for lo in range(0, num, batch_size):
        eps = noise[lo:lo + batch_size].to(device)
        lab = None if labels is None else labels[lo:lo + batch_size].to(device)
        renoise = torch.Generator(device).manual_seed(seed + 1 + lo)
        out.append(sample_batch(model, cfg, sampler, eps, lab, generator=renoise).cpu())
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
