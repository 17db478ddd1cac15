"""Score an exported network, or make reference statistics (docs/evaluation.md has the protocol).

    # FID / FD_DINOv2 as the paper and EDM2 report them: 50,000 images from seeds 0-49999, sharded over ranks
    cmt-evaluate --run-dir runs/cifar10-ect --metrics fid --ref cifar10-32x32.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --steps 2 --out metrics.json
    torchrun --nproc_per_node 8 -m engine.cli.evaluate --run-dir RUN --metrics fid fd_dinov2 --ref img512.pkl ...

    # reference statistics of a dataset, in EDM's .npz (one metric) or EDM2's refs .pkl (several)
    cmt-evaluate ref --data datasets/cifar10.zip --metrics fid --inception W --out cifar10-32x32.npz

    # the embedded digits (no files): fd_digits_cnn with the held-out floor and the untrained network
    cmt-evaluate --run-dir runs/demo/pre --json metrics.json

`--seeds` may be given several times (e.g. 0-49999 50000-99999 100000-149999): each set is scored and the
minimum reported, as EDM2 recommends. Fewer than 50,000 images are scored with a warning and marked
"comparable": false. metrics.json holds the scores, N, the seeds, the sampler and the reference's sha256.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.cli import CommandParser, entry_point, positive
from engine.config import Config, apply_override, from_dict, load_config, to_dict
from engine.errors import ConfigError, DataError
from engine.eval.frechet import METRIC_NAME
from engine.eval.generate import sampler_settings
from engine.eval.protocol import (METRICS, PUBLISHED_NUM_IMAGES, build_metrics, dataset_statistics, latent_decoder,
                                  minimum_over_seed_sets, parse_seeds, score, seed_format, to_uint8)
from engine.eval.report import report
from engine.files import write_text_atomically
from engine.models.factory import model_kind
from engine.models.weights import load_exported


def _detector_flags(p: CommandParser) -> None:
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="what to compute (default: the run's eval.metrics)")
    p.add_argument("--inception", default=None, help="Inception-v3 weights for fid (pytorch-fid's .pth)")
    p.add_argument("--dinov2", default=None, help="DINOv2 ViT-L/14 weights for fd_dinov2")
    p.add_argument("--batch", type=positive, default=64, help="images per batch and rank")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")


def _world():
    """(rank, world size, gather-to-rank-0) under torchrun/deepspeed; a world of one under plain python."""
    import os

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, None
    from engine.trainer.distributed import init_distributed
    from engine.trainer.scoring import gather_to_main

    rank, size = init_distributed()
    return rank, size, gather_to_main


def _device(arg):
    import os

    if arg:
        return torch.device(arg)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")


@entry_point
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ref"]:
        return _reference(argv[1:])
    p = CommandParser(description=__doc__)
    p.add_argument("--run-dir", required=True, help="a training run dir (or its export/ dir)")
    p.add_argument("--out", "--json", dest="out", default=None,
                   help="the metrics JSON to write (default: RUN/metrics.json)")
    _detector_flags(p)
    p.add_argument("--ref", default=None, help="reference statistics: EDM .npz, EDM2 refs .pkl, ADM .npz")
    # not --num: torchrun would take it for an abbreviation of its --numa-binding
    p.add_argument("--num-images", type=positive, default=None,
                   help=f"images, seeds 0..N-1 (default {PUBLISHED_NUM_IMAGES}; the digits report: eval.num)")
    p.add_argument("--seeds", action="append", default=None, help="seed range(s), e.g. 0-49999; repeat for several")
    p.add_argument("--steps", type=positive, default=None)
    p.add_argument("--solver", choices=["dpm_solver_pp", "heun", "euler"], default=None)
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None)
    p.add_argument("--t-mid", type=float, default=None,
                   help="2-step consistency sampling: the noise level it re-noises to (default: the run's sample.t_mid)")
    p.add_argument("--vae", default=None, help="latent runs: the SD-VAE (diffusers dir) decoding the samples")
    p.add_argument("--png-zip", default=None, help="also write every image to this zip ({seed:06d}.png)")
    p.add_argument("--no-untrained", action="store_true", help="digits report: skip scoring the untrained network")
    args = p.parse_args(argv)
    cfg, net, meta = load_exported(args.run_dir)
    if args.t_mid is not None:
        kind = model_kind(cfg, meta.get("stage", "pre"))
        if kind != "consistency" or args.steps != 2:
            raise ConfigError(f"--t-mid applies to 2-step consistency sampling (--steps 2); this is a '{kind}' "
                              f"network at --steps {args.steps}")
        raw = to_dict(cfg)
        apply_override(raw, f"sample.t_mid={args.t_mid}")
        cfg = from_dict(Config, raw)                # checked as any config is (range, σ bounds)
    out = Path(args.out) if args.out else Path(args.run_dir) / "metrics.json"
    names = args.metrics or list(cfg.eval.metrics)
    if names == [METRIC_NAME] and not (args.seeds or args.ref or args.png_zip):   # the digits report
        results = report(net, cfg, meta, args.num_images, not args.no_untrained,
                         solver=args.solver, steps=args.steps, order=args.order)
        write_text_atomically(out, json.dumps(results, indent=2))
        m = results["model"]
        line = f"{METRIC_NAME}: model {m[METRIC_NAME]:.2f} ({m['fd_num_images']} images)"
        if f"{METRIC_NAME}_297" in m:
            line += f", at 297 images {m[f'{METRIC_NAME}_297']:.2f} vs data floor {m[f'{METRIC_NAME}_floor_297']:.2f}"
        if "untrained" in results:
            line += f"; untrained network {results['untrained'][METRIC_NAME]:.2f}"
        print(f"{line}  -> {out}")
        return 0

    seed_sets = [parse_seeds(s) for s in args.seeds] if args.seeds else \
        [list(range(args.num_images or PUBLISHED_NUM_IMAGES))]
    if args.seeds and args.num_images:
        raise ConfigError("pass --num-images or --seeds, not both (--seeds 0-49999 is --num-images 50000)")
    device = _device(args.device)
    rank, size, gather = _world()
    e = cfg.eval
    ref = args.ref or e.ref
    metrics = build_metrics(cfg, names, ref=ref, inception=args.inception or e.inception,
                            dinov2=args.dinov2 or e.dinov2, device=device)
    sampler = sampler_settings(cfg, model_kind(cfg, meta.get("stage", "pre")), args.solver, args.steps, args.order)
    vae = args.vae or e.vae
    decode = latent_decoder(cfg, vae, device) if vae else None
    if any(len(s) < PUBLISHED_NUM_IMAGES for s in seed_sets) and rank == 0:
        print(f"warning: fewer than {PUBLISHED_NUM_IMAGES} images per seed set: the scores are not comparable with "
              "published ones (marked \"comparable\": false)", file=sys.stderr)
    per_set = []
    for i, seeds in enumerate(seed_sets):
        zip_path = args.png_zip if len(seed_sets) == 1 or not args.png_zip else \
            str(Path(args.png_zip).with_suffix(f".{i}.zip"))
        per_set.append(score(net.to(device), cfg, sampler, seeds, metrics, batch_size=args.batch, device=device,
                             rank=rank, world_size=size, gather=gather, decode=decode, png_zip=zip_path))
    if rank != 0:
        return 0
    results = minimum_over_seed_sets(per_set, names)
    results.update(num_images=len(seed_sets[0]), seeds=[seed_format(s) for s in seed_sets],
                   comparable=all(r["comparable"] for r in per_set), sampler=sampler,
                   run={k: meta.get(k) for k in ("stage", "kimg", "step", "checkpoint")},
                   ranks=size)
    if any(n != METRIC_NAME for n in names):
        from engine.eval.references import reference_hash
        results["reference"] = {"path": str(ref), "sha256": reference_hash(ref)}
    if args.png_zip:
        results["png_zip"] = args.png_zip
    write_text_atomically(out, json.dumps(results, indent=2))
    shown = ", ".join(f"{n} {results[n]:.3f}" for n in names)
    print(f"{shown} ({results['num_images']} images{'' if results['comparable'] else ', not comparable'}) -> {out}")
    return 0


def _reference(argv) -> int:
    """cmt-evaluate ref: reference statistics of a dataset (a folder or zip of images, or 'digits')."""
    p = CommandParser(prog="cmt-evaluate ref", description="Reference statistics of a dataset's images.")
    p.add_argument("--data", required=True, help="a folder or .zip of images (dataset_tool layout), or 'digits'")
    p.add_argument("--out", required=True, help="stats.npz (EDM's format, one metric) or refs.pkl (EDM2's)")
    p.add_argument("--resolution", type=positive, default=16, help="--data digits: the side")
    p.add_argument("--max-images", type=positive, default=None, help="the first N images only")
    _detector_flags(p)
    args = p.parse_args(argv)
    names = args.metrics or ["fid"]
    if METRIC_NAME in names:
        raise ConfigError(f"{METRIC_NAME}'s reference is built in (the digits train split): ask for fid or fd_dinov2")
    cfg = load_config(None, ["data.channels=3"])
    device = _device(args.device)
    metrics = build_metrics(cfg, names, inception=args.inception, dinov2=args.dinov2, device=device,
                            with_reference=False)
    load, count, source = _image_loader(args.data, args.resolution)
    count = min(count, args.max_images or count)
    rank, size, gather = _world()
    stats = dataset_statistics(load, count, metrics, batch_size=args.batch, rank=rank, world_size=size,
                               gather=gather)
    if rank != 0:
        return 0
    from engine.eval.references import ReferenceStats, write_reference

    path = write_reference(args.out, {n: ReferenceStats(n, mu, sigma, count, source) for n, (mu, sigma)
                                      in stats.items()})
    print(f"wrote {path}: {', '.join(names)} statistics of {count} images of {source}")
    return 0


def _image_loader(data: str, resolution: int):
    """(load(indices) -> uint8 [B, C, H, W], count, description) of --data, images read one at a time."""
    if data == "digits":
        from engine.data.dataset import build_dataset

        images = build_dataset("digits", resolution=resolution, channels=1).images
        return (lambda idx: to_uint8(images[idx])), len(images), f"digits {resolution}x{resolution} (train split)"
    import numpy as np

    from engine.data.prepare import ImageSource

    source = ImageSource(data, "--data")

    def load(indices):
        images = [torch.from_numpy(np.asarray(source.open(i), dtype=np.uint8).copy()).permute(2, 0, 1)
                  for i in indices]
        sizes = {tuple(im.shape[1:]) for im in images}
        if len(sizes) > 1:
            raise DataError(f"'{data}' holds images of different sizes ({sorted(sizes)[:2]}, in "
                            f"{source.names[indices[0]]} ...): make them one size first (cmt-prepare)")
        return torch.stack(images)
    return load, len(source), str(data)


if __name__ == "__main__":
    raise SystemExit(main())
