"""The evaluation protocol of the paper and EDM2 (docs/evaluation.md): N images from seeds 0…N−1, each from its
own seed, scored by Fréchet distances to reference statistics.

- **Seeds.** Image i's noise, class label and re-noising noise come from ``torch.Generator().manual_seed(seed_i)``
  alone, and images are made in fixed batches of consecutive seeds: the images (and so the statistics) do not
  depend on how many ranks ran them. Batch b goes to rank b mod world_size; the features come back to rank 0
  in seed order.
- **Images.** Samples in [−1, 1] become uint8 as EDM saves them, ``x·127.5 + 128`` clipped and truncated; latent
  samples are first decoded by the VAE (``decode``). Detectors take the uint8 images and resize them their own
  way (engine/eval/detectors.py).
- **Metrics.** ``fid`` (Inception-v3 pool features), ``fd_dinov2`` (DINOv2 ViT-L/14 CLS features), against
  reference statistics (engine/eval/references.py); ``fd_digits_cnn`` for the embedded digits (its reference is
  the digits train split; engine/eval/frechet.py). Fewer images than the published 50,000 are scored, marked
  ``comparable: false``.
"""
from __future__ import annotations

import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine.config import Config
from engine.errors import ConfigError, DataError, MissingFileError
from engine.eval.frechet import digits_reference, extract_features, feature_statistics, frechet_distance_from_statistics
from engine.eval.generate import sample_batch
from engine.models.factory import wrap_network

PUBLISHED_NUM_IMAGES = 50_000
METRICS = ("fd_digits_cnn", "fid", "fd_dinov2")


def parse_seeds(text: str) -> list[int]:
    """'0-49999' or '0-9,20-29,100' → the seeds, in order; a one-line ConfigError for anything else."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise ConfigError(f"--seeds '{text}' is not a seed range: write e.g. 0-49999 or 0-9,20-29") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' must name distinct non-negative seeds, e.g. 0-49999")
    return seeds


def seed_format(seeds: list[int]) -> str:
    """The shortest 'a-b,c-d' text for `seeds` (for metrics.json)."""
    parts, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            a, b = seeds[start], seeds[i - 1]
            parts.append(f"{a}-{b}" if b > a else f"{a}")
            start = i
    return ",".join(parts)


def seed_inputs(seeds: list[int], cfg: Config, renoise_steps: int) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                                            list[torch.Tensor]]:
    """(noise [N,C,H,W], labels [N] or None, re-noise noises) with each image's from its own seed: its noise,
    then its label, then one noise per re-noise level."""
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    classes = cfg.network.num_classes
    noise, labels, renoise = [], [], [[] for _ in range(renoise_steps)]
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(shape, generator=g))
        if classes:
            labels.append(torch.randint(0, classes, (), generator=g))
        for level in renoise:
            level.append(torch.randn(shape, generator=g))
    return (torch.stack(noise), torch.stack(labels) if classes else None, [torch.stack(r) for r in renoise])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] → uint8, as EDM writes its PNGs (x·127.5 + 128, clipped, truncated)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@dataclass
class Metric:
    """A Fréchet distance: `features` maps uint8 images [N, 3 or 1, H, W] to [N, D]; `reference` is (mu, sigma)
    (None while reference statistics are being made)."""
    name: str
    features: Callable[[torch.Tensor], torch.Tensor]
    reference: Optional[tuple[np.ndarray, np.ndarray]]


def latent_decoder(cfg: Config, vae_dir, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latent samples → pixels in [−1, 1] with the SD-VAE in `vae_dir`, denormalised as the training latents
    were normalised (latents.json beside data.path, written by cmt-latents encode)."""
    import json

    from engine.data.latents import LatentNorm, decode_latents, load_vae

    manifest = Path(cfg.data.path or ".").parent / "latents.json"
    if not manifest.is_file():
        raise MissingFileError(f"eval.vae is set but there is no latents.json beside data.path '{cfg.data.path}': "
                               "it says how the latents were normalised (cmt-latents encode writes it)")
    vae, norm = load_vae(vae_dir, device), LatentNorm.from_json(json.loads(manifest.read_text()))
    return lambda latents: decode_latents(vae, latents, norm)


def build_metrics(cfg: Config, names: list[str], *, ref=None, inception=None, dinov2=None,
                  device: str | torch.device = "cpu", with_reference: bool = True) -> list[Metric]:
    """The metrics `names` with their detectors and (``with_reference``) references; a one-line error naming
    the setting and the file for what is missing. Keys in the errors are the config's (eval.*); the command's
    flags match them."""
    metrics = []
    for name in names:
        if name == "fd_digits_cnn":
            if cfg.data.source != "digits":
                raise ConfigError(f"fd_digits_cnn scores the embedded digits only (data.source={cfg.data.source}): "
                                  "use eval.metrics fid / fd_dinov2 with eval.ref")
            net, reference = digits_reference(cfg.data.resolution)
            metrics.append(Metric(name, lambda px, net=net: extract_features((px.float() - 127.5) / 127.5, net),
                                  reference))
            continue
        from engine.eval.detectors import WEIGHT_FILES, load_detector
        from engine.eval.references import read_reference

        key, weights = ("eval.inception", inception) if name == "fid" else ("eval.dinov2", dinov2)
        if weights is None:
            raise MissingFileError(f"{name} needs its detector's weights: set {key} (--{key[5:]}) to "
                                   f"{WEIGHT_FILES[name]}")
        if ref is None and with_reference:
            raise MissingFileError(f"{name} needs reference statistics: set eval.ref (--ref) to an EDM .npz, an EDM2 "
                                   "refs .pkl, or one made with `cmt-evaluate ref --data DATASET --out stats.npz`")
        detector = load_detector(name, weights, device)
        stats = read_reference(ref, name) if with_reference else None
        metrics.append(Metric(name, lambda px, d=detector: d(px.to(device)),
                              None if stats is None else (stats.mu, stats.sigma)))
    return metrics


@torch.no_grad()
def score(net: torch.nn.Module, cfg: Config, sampler: dict, seeds: list[int], metrics: list[Metric], *,
          batch_size: int = 64, device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
          gather: Callable | None = None, decode: Callable | None = None, png_zip: str | Path | None = None,
          progress: bool = True) -> dict | None:
    """Generate the images of `seeds` with the raw network `net` (as ``sampler['kind']``) and score them.

    Every rank calls this with the same arguments; `gather(obj) -> list of every rank's obj` on rank 0 (None
    elsewhere) joins the shards. Returns the results on rank 0, None on the others. ``png_zip`` receives every
    image as ``{seed:06d}.png`` in seed order: each rank writes its PNGs beside it (a shared file system, as for
    checkpoints), rank 0 zips them once all are done.
    """
    if len(seeds) < 2:
        raise ConfigError(f"{len(seeds)} images: a Fréchet distance needs at least 2 (a covariance)")
    model = wrap_network(net, cfg, sampler["kind"]).eval()
    renoise_steps = sampler["steps"] - 1 if sampler["kind"] == "consistency" else 0
    batches = [seeds[lo:lo + batch_size] for lo in range(0, len(seeds), batch_size)]
    mine = {b: batch for b, batch in enumerate(batches) if b % world_size == rank}
    bar = _bar(progress and rank == 0, len(seeds))
    parts = Path(str(png_zip) + ".parts") if png_zip else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
    shard: dict[int, dict] = {}
    for b, batch in mine.items():
        eps, labels, renoise = seed_inputs(batch, cfg, renoise_steps)
        images = sample_batch(model, cfg, sampler, eps.to(device), None if labels is None else labels.to(device),
                              renoise=renoise)
        if not torch.isfinite(images).all():
            raise DataError("the generated images contain NaN or infinite values: the network diverged (look at "
                            "its log.jsonl) or its export is damaged")
        if decode is not None:
            images = decode(images)
        pixels = to_uint8(images.cpu())
        shard[b] = {m.name: m.features(pixels).float().cpu() for m in metrics}
        if parts is not None:
            _write_pngs(parts, batch, pixels)
        bar.update(len(batch) * world_size)
    bar.close()
    features = _joined(shard, len(batches), metrics, gather, rank)
    if features is None:
        return None
    if parts is not None:
        _zip_pngs(parts, seeds, Path(png_zip))
    out = {"num_images": len(seeds), "comparable": len(seeds) >= PUBLISHED_NUM_IMAGES}
    for m in metrics:
        mu, sigma = m.reference
        if features[m.name].shape[1] != len(mu):
            raise DataError(f"the {m.name} reference has {len(mu)}-d statistics, the detector gives "
                            f"{features[m.name].shape[1]}-d features: use a reference made for {m.name}")
        out[m.name] = frechet_distance_from_statistics(*feature_statistics(features[m.name]), mu, sigma)
    return out


def _joined(shard: dict, num_batches: int, metrics: list[Metric], gather, rank: int) -> dict | None:
    """Every rank's {batch: {metric: features}} joined on rank 0 into {metric: [N, D] float64} in batch
    order (None on the other ranks)."""
    shards = [shard] if gather is None else gather(shard)
    if rank != 0:
        return None
    joined = {b: s for part in shards for b, s in part.items()}
    if sorted(joined) != list(range(num_batches)):
        raise RuntimeError(f"ranks returned batches {sorted(joined)} of {num_batches}")
    return {m.name: torch.cat([joined[b][m.name] for b in range(num_batches)]).double() for m in metrics}


@torch.no_grad()
def dataset_statistics(load: Callable[[list[int]], torch.Tensor], count: int, metrics: list[Metric], *,
                       batch_size: int = 64, rank: int = 0, world_size: int = 1, gather: Callable | None = None,
                       progress: bool = True) -> dict | None:
    """{metric: (mu, sigma)} of a dataset's images, ``load(indices) -> uint8 [B, C, H, W]``, in the same fixed
    batches over ranks as :func:`score` (rank 0 gets the result, the others None)."""
    if count < 2:
        raise DataError(f"the dataset has {count} images: reference statistics need at least 2")
    batches = [list(range(lo, min(lo + batch_size, count))) for lo in range(0, count, batch_size)]
    bar = _bar(progress and rank == 0, count, "reference statistics")
    shard = {}
    for b, batch in enumerate(batches):
        if b % world_size == rank:
            pixels = load(batch)
            shard[b] = {m.name: m.features(pixels).float().cpu() for m in metrics}
            bar.update(len(batch) * world_size)
    bar.close()
    features = _joined(shard, len(batches), metrics, gather, rank)
    return None if features is None else {name: feature_statistics(f) for name, f in features.items()}


def _write_pngs(folder: Path, seeds: list[int], pixels: torch.Tensor) -> None:
    from PIL import Image

    for seed, img in zip(seeds, pixels):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(folder / f"{seed:06d}.png")


def _zip_pngs(folder: Path, seeds: list[int], path: Path) -> None:
    """The PNGs as one zip in seed order, written under a temporary name and renamed (a kill leaves no half
    zip), then the loose files removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for seed in seeds:
            z.write(folder / f"{seed:06d}.png", f"{seed:06d}.png")
    tmp.replace(path)
    shutil.rmtree(folder)


class _NullBar:
    def update(self, n): pass
    def close(self): pass


def _bar(enabled: bool, total: int, desc: str = "generating + scoring"):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=2.0, dynamic_ncols=True)


def minimum_over_seed_sets(results: list[dict], names: list[str]) -> dict:
    """EDM2's recommendation: score several seed sets and report each metric's minimum, with every value."""
    if len(results) == 1:
        return dict(results[0])
    out = {name: min(r[name] for r in results) for name in names}
    out.update({f"{name}_per_seed_set": [r[name] for r in results] for name in names})
    return out
