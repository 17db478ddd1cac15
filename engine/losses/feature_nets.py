"""Feature networks for perceptual losses: the GroupNorm VGG of ELatentLPIPS (docs/method.md §7), trained as a
classifier, stored with its architecture, and the small one the embedded digits use.

The digits feature net is trained once, deterministically, and cached (engine.files.cache_dir). It is a
different network (GN-VGG, SGD recipe) from the evaluator's CNN, so the loss is never the metric.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from engine.data.dataset import build_dataset
from engine.errors import DataError, MissingFileError
from engine.files import cached_file, write_atomically
from engine.losses.augment import gather_pixels, random_flip_translate

# VGG16 with the ELatentLPIPS pooling (docs/method.md §7): 13 convs, pools only before slices 4 and 5.
VGG16_GN_CFG = (64, 64, 128, 128, 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The five slices, tapped at their last ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_SLICES = ((64, 64), (128, 128), (256, 256, 256), ("M", 512, 512, 512), ("M", 512, 512, 512))

TRAIN_HINT = ("train one with `cmt-train-feature-net --data LATENTS.npy --labels LABELS.npy "
              "--out FILE.safetensors` (or `--data digits`)")


def _num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of C that is ≤ 32 and leaves ≥ 2 channels per group."""
    for g in range(min(32, max(1, channels // 2)), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GNVGG(nn.Module):
    """VGG16-style conv net with GroupNorm; ``taps(x)`` gives the features after each of its slices.

    ``width`` scales every conv's channels (min 1), ``depth`` caps the convs per slice (None = VGG16's
    2, 2, 3, 3, 3). With ``resolution`` given, slices whose input would be smaller than 1×1 after their
    pooling are dropped (so tiny inputs get fewer taps). The classifier head (global average pool of the
    last tap + linear) exists only to train the features.
    """

    def __init__(self, in_channels: int = 4, num_classes: int = 1000, width: float = 1.0,
                 depth: Optional[int] = None, resolution: Optional[int] = None):
        super().__init__()
        self.arch = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                     "depth": depth, "resolution": resolution}
        slices, c_in, size = [], in_channels, resolution
        for spec in VGG16_SLICES:
            pool = spec[0] == "M"
            convs = [c for c in spec if c != "M"][:depth if depth is not None else None]
            if pool and size is not None:
                size //= 2
                if size < 1:
                    break
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
            for c in convs:
                c = max(1, round(c * width))
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(_num_groups(c), c), nn.ReLU()]
                c_in = c
            slices.append(nn.Sequential(*layers))
        self.slices = nn.ModuleList(slices)
        self.tap_channels = [next(m.num_channels for m in reversed(s) if isinstance(m, nn.GroupNorm))
                             for s in self.slices]
        self.classifier = nn.Linear(c_in, num_classes)
        self.heldout_accuracy = float("nan")   # set by train_feature_classifier, kept in the weights file
        self.train_seconds = float("nan")

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.taps(x)[-1].mean(dim=(2, 3)))


def train_feature_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: Optional[int] = None,
                             width: float = 1.0, depth: Optional[int] = None, epochs: int = 100,
                             batch_size: int = 256, lr: float = 0.1, momentum: float = 0.9,
                             weight_decay: float = 1e-4, lr_step_fraction: float = 0.3, max_shift: int = 0,
                             flip: bool = False, seed: int = 0,
                             heldout: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> GNVGG:
    """Train a GNVGG classifier on (images [N,C,H,W], labels [N]); returns it in eval mode.

    SGD (lr, momentum 0.9, weight decay 1e-4), lr ÷10 every ``lr_step_fraction`` of the epochs (30/60/90 of
    100), random shifts of up to ``max_shift`` pixels (and x-flips with ``flip``) as augmentation.
    Deterministic for a seed, torch build and thread count: the init and the data order use their own RNG.
    ``heldout`` (images, labels) sets ``.heldout_accuracy``.
    """
    started = time.perf_counter()
    num_classes = num_classes or int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GNVGG(images.shape[1], num_classes, width=width, depth=depth, resolution=images.shape[-1])
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    step_every = max(1, math.ceil(lr_step_fraction * epochs))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_every, gamma=0.1)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = images[idx]
            if max_shift > 0 or flip:
                rows, cols = random_flip_translate(len(idx), x.shape[2], x.shape[3], max_shift, flip,
                                                    generator, x.device)
                x = gather_pixels(x, rows, cols)
            loss = F.cross_entropy(net(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    net.eval()
    if heldout is not None:
        with torch.no_grad():
            net.heldout_accuracy = (net(heldout[0]).argmax(1) == heldout[1]).float().mean().item()
    net.train_seconds = time.perf_counter() - started
    return net.requires_grad_(False)


def save_trained_net(net: nn.Module, path: str | Path, metadata: dict) -> Path:
    """Write a trained helper net's weights with ``metadata`` and its held-out accuracy and training time,
    atomically (a reader never sees half a file)."""
    metadata = dict(metadata, heldout_accuracy=repr(net.heldout_accuracy), train_seconds=repr(net.train_seconds))
    state = {name: tensor.contiguous() for name, tensor in net.state_dict().items()}
    return write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata))


def save_feature_net(net: GNVGG, path: str | Path, extra: Optional[dict] = None) -> Path:
    """Write a GNVGG's weights with its architecture in the metadata."""
    return save_trained_net(net, path, {"arch": json.dumps(net.arch), **(extra or {})})


def load_feature_net(path: str | Path) -> GNVGG:
    """A GNVGG written by :func:`save_feature_net`, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"feature-net weights '{path}' do not exist: {TRAIN_HINT}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        net = GNVGG(**json.loads(metadata["arch"]))
        net.load_state_dict(load_file(str(path)))
        net.heldout_accuracy = float(metadata.get("heldout_accuracy", "nan"))
        net.train_seconds = float(metadata.get("train_seconds", "nan"))
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
        raise DataError(f"'{path}' is not a GN-VGG feature net written by save_feature_net "
                        f"({error}); {TRAIN_HINT}") from None
    return net.eval().requires_grad_(False)


# The digits feature net: everything that changes its weights; the hash names the cache file.
# 5 taps of 8/16/32/64/64 channels at 16x16; ~98% held-out accuracy after ~20 s on one core.
DIGITS_GNVGG_RECIPE = {
    "architecture": "gnvgg16-elatentlpips-pooling",
    "width": 0.125,
    "depth": 1,
    "seed": 0,
    "epochs": 20,
    "batch_size": 64,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "lr_step_fraction": 0.3,
    "max_shift_pixels_at_16px": 1,
}


def digits_feature_net_path(resolution: int, cache_dir: str | Path | None = None,
                            recipe: dict = DIGITS_GNVGG_RECIPE) -> Path:
    return cached_file(f"digits_gnvgg_r{resolution}", {"recipe": recipe, "resolution": resolution}, cache_dir)


def get_digits_feature_net(resolution: int = 16, cache_dir: str | Path | None = None,
                           recipe: dict = DIGITS_GNVGG_RECIPE) -> GNVGG:
    """The digits GN-VGG (the `feature` loss), loaded from the cache or trained on the digits train split
    and cached first (cache_dir defaults to $CMT_CACHE, else ~/.cache/cmt_engine)."""
    path = digits_feature_net_path(resolution, cache_dir, recipe)
    if path.exists():
        return load_feature_net(path)
    train = build_dataset("digits", resolution=resolution, split="train")
    held = build_dataset("digits", resolution=resolution, split="heldout")
    net = train_feature_classifier(
        train.images, train.labels, width=recipe["width"], depth=recipe["depth"], epochs=recipe["epochs"],
        batch_size=recipe["batch_size"], lr=recipe["lr"], momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"], lr_step_fraction=recipe["lr_step_fraction"],
        max_shift=max(1, round(recipe["max_shift_pixels_at_16px"] * resolution / 16)), seed=recipe["seed"],
        heldout=(held.images, held.labels))
    save_feature_net(net, path, {"recipe": json.dumps(recipe, sort_keys=True), "resolution": str(resolution)})
    return net
