"""Train the ELatentLPIPS feature net (a GroupNorm VGG16, docs/method.md §7) as a classifier on local data.

    cmt-train-feature-net --data latents.npy --labels labels.npy --out latent_vgg.safetensors
    cmt-train-feature-net --data digits --resolution 16 --out digits_vgg.safetensors

The authors' recipe (docs/method.md §7): SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr ÷10 every 30% of
the epochs (30/60/90 of 100). ``--width``/``--depth``/``--epochs`` scale it down for small data (the full
net is --width 1, no --depth). Augmentation while training: random integer shifts (and x-flips with --flip),
the geometric augmentations the ensembled distance also uses. A seeded held-out split reports accuracy.

Writes ``--out`` (safetensors with the architecture in its metadata, what ``build_distance`` and the
``mid.feature_net``/``post.feature_net`` config keys load) and ``--out`` with a ``.json`` suffix
(architecture, recipe, data, held-out accuracy, seconds) for people.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from engine.cli import CommandParser, entry_point
from engine.data.dataset import build_dataset
from engine.errors import ConfigError, DataError, MissingFileError
from engine.losses.feature_nets import save_feature_net, train_feature_classifier


def load_arrays(data: str, labels: str | None, resolution: int):
    """(images [N,C,H,W] float32, labels [N] int64, description) from .npy files or the embedded digits."""
    if data == "digits":
        train = build_dataset("digits", resolution=resolution, split="train")
        held = build_dataset("digits", resolution=resolution, split="heldout")
        images = torch.cat([train.images, held.images])
        return images, torch.cat([train.labels, held.labels]), f"digits at {resolution}px"
    if labels is None:
        raise ConfigError("--labels LABELS.npy is required with --data FILE.npy (one integer class per sample)")
    arrays = []
    for name, path in (("--data", data), ("--labels", labels)):
        if not Path(path).is_file():
            raise MissingFileError(f"{name} '{path}' does not exist: pass a .npy file")
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as error:
            raise DataError(f"{name} '{path}' is not a .npy array ({error}): save it with numpy.save") from None
    x, y = arrays
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"--data '{data}' must be float latents [N, C, H, W], got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError(f"--labels '{labels}' must be {x.shape[0]} non-negative integers, got {y.dtype} {y.shape}")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), f"{data} + {labels}"


def split(images: torch.Tensor, labels: torch.Tensor, heldout_fraction: float, seed: int):
    """A seeded random (train, held-out) split; held-out is empty for fraction 0."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_held = int(round(heldout_fraction * len(images)))
    held, train = order[:n_held], order[n_held:]
    return (images[train], labels[train]), (images[held], labels[held])


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = CommandParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="latents .npy [N,C,H,W], or 'digits'")
    p.add_argument("--labels", help="class labels .npy [N] (with a .npy --data)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--resolution", type=int, default=16, help="digits only: image size")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = VGG16)")
    p.add_argument("--depth", type=int, default=None, help="convs per slice cap (default: VGG16's 2,2,3,3,3)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-step-fraction", type=float, default=0.3)
    p.add_argument("--max-shift", type=int, default=1, help="random shift augmentation, pixels")
    p.add_argument("--flip", action="store_true", help="random x-flips as augmentation")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        raise ConfigError(f"--out '{args.out}' must end in .safetensors")
    if not 0 <= args.heldout_fraction < 1:
        raise ConfigError("--heldout-fraction must be in [0, 1)")

    images, labels, description = load_arrays(args.data, args.labels, args.resolution)
    (x, y), held = split(images, labels, args.heldout_fraction, args.seed)
    recipe = {k: getattr(args, k) for k in ("width", "depth", "epochs", "batch_size", "lr", "momentum",
                                            "weight_decay", "lr_step_fraction", "max_shift", "flip", "seed")}
    net = train_feature_classifier(x, y, num_classes=int(labels.max()) + 1,
                                   heldout=held if len(held[0]) else None, **recipe)
    out = Path(args.out)
    save_feature_net(net, out, {"recipe": json.dumps(recipe, sort_keys=True), "data": description})
    summary = {"weights": str(out), "arch": net.arch, "recipe": recipe, "data": description,
               "train_samples": len(x), "heldout_samples": len(held[0]),
               "heldout_accuracy": None if math.isnan(net.heldout_accuracy) else net.heldout_accuracy,
               "train_seconds": round(net.train_seconds, 2)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
