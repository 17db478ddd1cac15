"""Score an exported network: Fréchet distance in the digits-CNN feature space (NOT Inception FID).

The report sets the model's distance beside the held-out-data floor and beside the distance of the
same architecture untrained (initialised with the run's seed), so the number has both ends of its scale.
"""
from __future__ import annotations

import time

import torch

from engine.config import Config
from engine.errors import ConfigError, UnsupportedError
from engine.eval.frechet import METRIC_NAME, evaluate_images
from engine.eval.generate import generate, sampler_settings
from engine.models.factory import build_raw_network, model_kind


def evaluate_network(net: torch.nn.Module, cfg: Config, kind: str, num_samples: int | None = None,
                     **sampler) -> dict:
    """Generate `num_samples` images as `kind` (engine.models.factory.model_kind) and score them."""
    if cfg.data.source != "digits":
        raise UnsupportedError(f"fd_digits_cnn scores the embedded digits only (this run uses data.source="
                               f"{cfg.data.source}): pass --metrics fid / fd_dinov2 with --ref (docs/evaluation.md)")
    num = cfg.eval.num if num_samples is None else num_samples
    if num < 2:
        raise ConfigError(f"{num} samples: a Fréchet distance needs at least 2 (a covariance)")
    images = generate(net, cfg, kind, num, cfg.eval.seed, **sampler)
    return evaluate_images(images, resolution=cfg.data.resolution)


def report(net: torch.nn.Module, cfg: Config, meta: dict, num_samples: int | None = None,
           include_untrained: bool = True, **sampler) -> dict:
    t0 = time.time()
    kind = model_kind(cfg, meta.get("stage", "pre"))
    solver = sampler_settings(cfg, kind, **sampler)
    out = {
        "metric": f"{METRIC_NAME}: Fréchet distance in the 64-d features of a CNN trained on the digits "
                  "(not Inception FID; compare only within this project, at equal sample counts)",
        "run": meta,
        "sampler": solver,
        "model": evaluate_network(net, cfg, kind, num_samples, **sampler),
    }
    if include_untrained:
        torch.manual_seed(cfg.train.seed)
        out["untrained"] = evaluate_network(build_raw_network(cfg).eval(), cfg, kind, num_samples, **sampler)
    out["seconds"] = round(time.time() - t0, 1)
    return out
