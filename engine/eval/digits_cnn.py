"""A small CNN digit classifier whose 64-d penultimate features define the Fréchet distance of frechet.py.

No Inception weights can be downloaded here, so the evaluator uses a network trained on the embedded
digits: once, deterministically, in ~10 s on 2 idle CPU cores, then cached on disk. Its distances are only
comparable with distances from the same recipe and resolution (the cache key hashes both).
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from engine.data.dataset import build_dataset
from engine.data.sources import DIGITS_NUM_CLASSES
from engine.errors import DataError
from engine.files import cached_file
from engine.losses.feature_nets import save_trained_net

FEATURE_DIM = 64

# Everything that changes the trained weights; its hash names the cache file, so any edit retrains.
TRAINING_RECIPE = {
    "architecture": "convbn16-pool-convbn32-convbn32-pool-convbn64-convbn64-gap-linear10",
    "seed": 0,
    "epochs": 20,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 3e-3,
    "lr_schedule": "cosine",
    "weight_decay": 0.0,
    "max_shift_pixels_at_16px": 1,
}


class FeatureNet(nn.Module):
    """Digits classifier on [N,1,R,R] images in [-1,1]; `.features` gives the pooled 64-d activations.

    BatchNorm makes the short training robust to the seed (≥99% held-out for every seed tried,
    against 94–97% without it).
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_block(1, 16), nn.MaxPool2d(2),
            *_conv_block(16, 32), *_conv_block(32, 32), nn.MaxPool2d(2),
            *_conv_block(32, 64), *_conv_block(64, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(FEATURE_DIM, DIGITS_NUM_CLASSES)
        self.heldout_accuracy = float("nan")  # measured by train_feature_net, kept in the cache file
        self.train_seconds = float("nan")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(images))


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


def cache_path(resolution: int, cache_dir: str | Path | None = None, recipe: dict = TRAINING_RECIPE) -> Path:
    """Cache file for this recipe and resolution: `digits_cnn_r{R}_{hash}.safetensors`."""
    return cached_file(f"digits_cnn_r{resolution}", {"recipe": recipe, "resolution": resolution}, cache_dir)


def get_feature_net(resolution: int = 16, cache_dir: str | Path | None = None,
                    recipe: dict = TRAINING_RECIPE) -> FeatureNet:
    """The trained net in eval mode, loaded from the cache or trained and cached first.

    cache_dir defaults to engine.files.cache_dir() ($CMT_CACHE, else ~/.cache/cmt_engine).
    """
    path = cache_path(resolution, cache_dir, recipe)
    if path.exists():
        net = _load(path)
    else:
        net = train_feature_net(resolution, recipe)
        save_trained_net(net, path, {"recipe": json.dumps(recipe, sort_keys=True), "resolution": str(resolution)})
    return net.eval().requires_grad_(False)


def _load(path: Path) -> FeatureNet:
    net = FeatureNet()
    try:
        net.load_state_dict(load_file(path))
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        net.heldout_accuracy = float(metadata["heldout_accuracy"])
        net.train_seconds = float(metadata["train_seconds"])
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
        raise DataError(f"feature-net cache {path} is unreadable ({error}): delete it to retrain") from None
    return net


def train_feature_net(resolution: int = 16, recipe: dict = TRAINING_RECIPE) -> FeatureNet:
    """Train on the digits train split with a fixed seed and random shifts; measure held-out accuracy.

    Deterministic for a given torch build and thread count (its own generator, no global RNG use).
    """
    started = time.perf_counter()
    train = build_dataset("digits", resolution=resolution, split="train")
    heldout = build_dataset("digits", resolution=resolution, split="heldout")
    generator = torch.Generator().manual_seed(recipe["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        net = FeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = -(-len(train) // recipe["batch_size"])
    total_steps = recipe["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    max_shift = max(1, round(recipe["max_shift_pixels_at_16px"] * resolution / 16))
    net.train()
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), recipe["batch_size"]):
            indices = order[start:start + recipe["batch_size"]]
            images = _random_shift(train.images[indices], max_shift, generator)
            loss = F.cross_entropy(net(images), train.labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval()
    with torch.no_grad():
        net.heldout_accuracy = (net(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    net.train_seconds = time.perf_counter() - started
    return net


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])
