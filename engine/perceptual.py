"""Perceptual distances (SPEC §7): one feature-distance mechanism behind every perceptual loss.

- :func:`feature_distance` — the per-tap distance, ``kernels.feature_distance`` (a fused C++/CUDA op with the
  one pure-PyTorch reference formula beside it): unit-normalise each feature map over channels, squared
  difference, optional non-negative per-channel weights (LPIPS heads) else a plain channel sum, spatial
  mean, giving one number per sample.
- :class:`GNVGG` — a VGG16-style net with GroupNorm (the ELatentLPIPS feature net), width/depth scalable so a
  tiny version fits 16×16×1 digits; taps after 5 slices.
- :class:`LPIPSVGG16` — torchvision's VGG16 conv trunk (weights from a local file) tapped at relu1_2 … relu5_3
  behind LPIPS's input scaling; with the heads the ``lpips`` package ships it is LPIPS(vgg, v0.1).
- :func:`train_feature_classifier` — trains a GNVGG as a classifier (SPEC §7 recipe), deterministically;
  ``python -m engine.train_feature_net`` is its command line.
- :class:`PerceptualDistance` — d(x, y) per sample = Σ_taps feature_distance, optionally under the same
  random flip/translation of both inputs (the "E" of ELatentLPIPS).
- :func:`build_distance` — ``l2 | feature | lpips | elatentlpips`` by name.

The digits feature net is cached with engine/features.py's cache directory and atomic writer, but it is a
different network (GN-VGG, SGD recipe) from the evaluator's CNN, so the loss is never the metric.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import pickle
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from engine.config import ConfigError
from engine.features import _save_atomically, default_cache_dir
from kernels.feature_distance import feature_distance, unit_normalize

__all__ = ["feature_distance", "unit_normalize", "GNVGG", "LPIPSVGG16", "PerceptualDistance", "L2Distance",
           "augment_pair", "build_distance", "load_feature_net", "save_feature_net", "train_feature_classifier",
           "get_digits_feature_net", "load_lpips_vgg16", "lpips_heads"]

# VGG16 with the ELatentLPIPS pooling (SPEC §7): 13 convs, pools only before slices 4 and 5.
VGG16_GN_CFG = (64, 64, 128, 128, 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The five slices, tapped at their last ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_SLICES = ((64, 64), (128, 128), (256, 256, 256), ("M", 512, 512, 512), ("M", 512, 512, 512))

TRAIN_HINT = ("train one with `python -m engine.train_feature_net --data LATENTS.npy --labels LABELS.npy "
              "--out FILE.safetensors` (or `--data digits`)")


# --------------------------------------------------------------------------------------------------
# The feature network
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Augmentation shared by classifier training and the ensembled distance
# --------------------------------------------------------------------------------------------------
def _random_flip_translate(batch: int, height: int, width: int, max_shift: int, flip: bool,
                           generator, device):
    """Per-sample source row/column indices [B, H], [B, W] of a random x-flip and integer shift
    (edges replicated)."""
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    if max_shift > 0:
        shift = torch.randint(-max_shift, max_shift + 1, (2, batch, 1), generator=generator, device=device)
        rows = (rows - shift[0]).clamp(0, height - 1)
        cols = (cols - shift[1]).clamp(0, width - 1)
    if flip:
        flipped = torch.rand(batch, 1, generator=generator, device=device) < 0.5
        cols = torch.where(flipped, width - 1 - cols, cols)
    return rows, cols


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def augment_pair(x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
                 max_shift_fraction: float = 0.125, flip: bool = True):
    """The same random x-flip and translation (up to ±fraction·size, edges replicated) applied to x and y.

    This is the ensembling of ELatentLPIPS: SPEC §7 asks for "the same random augmentation" on both inputs
    without naming it; flips and integer translations are the geometric part of the published E-LatentLPIPS
    ensemble. Its other augmentations (scaling, rotation, colour, cutout) are not implemented here.
    """
    B, _, H, W = x.shape
    max_shift = int(max_shift_fraction * min(H, W))
    rows, cols = _random_flip_translate(B, H, W, max_shift, flip, generator, x.device)
    return _gather(x, rows, cols), _gather(y, rows, cols)


# --------------------------------------------------------------------------------------------------
# Training the feature net (SPEC §7 recipe) and storing it
# --------------------------------------------------------------------------------------------------
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
                rows, cols = _random_flip_translate(len(idx), x.shape[2], x.shape[3], max_shift, flip,
                                                    generator, x.device)
                x = _gather(x, rows, cols)
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


def save_feature_net(net: GNVGG, path: str | Path, extra: Optional[dict] = None) -> Path:
    """Write a GNVGG's weights with its architecture in the metadata (atomically, via engine.features)."""
    path = Path(path)
    _save_atomically(net, path, {"arch": json.dumps(net.arch), **(extra or {})})
    return path


def load_feature_net(path: str | Path) -> GNVGG:
    """A GNVGG written by :func:`save_feature_net`, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature-net weights '{path}' do not exist: {TRAIN_HINT}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        net = GNVGG(**json.loads(metadata["arch"]))
        net.load_state_dict(load_file(str(path)))
        net.heldout_accuracy = float(metadata.get("heldout_accuracy", "nan"))
        net.train_seconds = float(metadata.get("train_seconds", "nan"))
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
        raise ValueError(f"'{path}' is not a GN-VGG feature net written by engine.perceptual.save_feature_net "
                         f"({error}); {TRAIN_HINT}") from None
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# LPIPS on pixels: torchvision's VGG16 trunk from a local file + the lpips package's linear heads
# --------------------------------------------------------------------------------------------------
# Index after the last ReLU of each LPIPS tap in torchvision's vgg16().features.
LPIPS_VGG16_TAP_ENDS = (4, 9, 16, 23, 30)
LPIPS_VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
VGG16_HINT = ("point it at torchvision's ImageNet VGG16 weights (vgg16-397923af.pth: a state dict with "
              "features.N.weight/bias keys, or the features' own N.weight/bias keys; .pth or .safetensors), "
              "downloaded on a machine with network access and copied here")


def load_lpips_vgg16(path: str | Path) -> nn.Sequential:
    """The conv trunk of torchvision's VGG16 up to relu5_3 (no classifier is built), weights from ``path``."""
    from torchvision.models.vgg import cfgs, make_layers

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights '{path}' do not exist: {VGG16_HINT}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        trunk = make_layers(cfgs["D"])[:LPIPS_VGG16_TAP_ENDS[-1]]
        trunk.load_state_dict(state)
    except (OSError, RuntimeError, ValueError, SafetensorError, EOFError, TypeError,
            pickle.UnpicklingError) as error:
        # torch.load's unpickling errors are pages long and suggest weights_only=False: name the type only
        reason = "not a torch checkpoint" if isinstance(error, pickle.UnpicklingError) else str(error).splitlines()[0]
        raise ValueError(f"'{path}' is not a VGG16 weights file ({reason}): {VGG16_HINT}") from None
    return trunk


def lpips_heads() -> list[torch.Tensor]:
    """The five non-negative per-channel heads of LPIPS(vgg, v0.1), read from the installed lpips package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise ConfigError("loss 'lpips' takes its linear heads from the lpips package: pip install lpips==0.1.4")
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{k}.model.1.weight"].reshape(-1) for k in range(len(LPIPS_VGG16_TAP_ENDS))]


class LPIPSVGG16(nn.Module):
    """VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of pixels in [-1, 1], after LPIPS's
    ScalingLayer ((x − shift)/scale per RGB channel). One-channel (grey) images are repeated to RGB."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, trunk: nn.Sequential, in_channels: int = 3):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"loss 'lpips' runs VGG16 on RGB (or grey) pixels, the data has {in_channels} channels")
        self.arch = {"in_channels": in_channels}
        bounds = (0,) + LPIPS_VGG16_TAP_ENDS
        self.slices = nn.ModuleList(trunk[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        self.tap_channels = list(LPIPS_VGG16_TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(self.SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).reshape(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out


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
    key = json.dumps({"recipe": recipe, "resolution": resolution}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"digits_gnvgg_r{resolution}_{digest}.safetensors"


def get_digits_feature_net(resolution: int = 16, cache_dir: str | Path | None = None,
                           recipe: dict = DIGITS_GNVGG_RECIPE) -> GNVGG:
    """The digits GN-VGG (the `feature` loss), loaded from the cache or trained on the digits train split
    and cached first (cache_dir defaults to $CMT_CACHE, else ~/.cache/cmt_engine)."""
    from engine.data import build_dataset

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


# --------------------------------------------------------------------------------------------------
# Distances as modules: d(x, y) -> [B]
# --------------------------------------------------------------------------------------------------
class L2Distance(nn.Module):
    """Mean squared error per sample."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return (x - y).square().flatten(1).mean(dim=1)


class PerceptualDistance(nn.Module):
    """d(x, y) = Σ_taps feature_distance(net.taps(x), net.taps(y)) per sample, with a frozen feature net.

    ``weights``: one non-negative per-channel head per tap (LPIPS) or None (plain channel sum).
    ``augment``: apply the same random x-flip/translation to both inputs first (ELatentLPIPS' "E").
    The net stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, net: nn.Module, weights: Optional[Sequence[torch.Tensor]] = None, augment: bool = False,
                 max_shift_fraction: float = 0.125):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.augment = augment
        self.max_shift_fraction = max_shift_fraction
        self.weights = None
        if weights is not None:
            for k, w in enumerate(weights):
                if (w < 0).any():
                    raise ValueError(f"perceptual head {k} has negative weights: heads must be non-negative")
                self.register_buffer(f"head{k}", w.detach().reshape(-1).clone())
            self.weights = len(weights)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def _heads(self, n: int):
        if self.weights is None:
            return [None] * n
        if self.weights != n:
            raise ValueError(f"{self.weights} heads for {n} feature taps")
        return [getattr(self, f"head{k}") for k in range(n)]

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.augment:
            x, y = augment_pair(x, y, generator, self.max_shift_fraction)
        fx = self.net.taps(x)
        if y.requires_grad:
            fy = self.net.taps(y)
        else:   # a fixed target: no graph through its features
            with torch.no_grad():
                fy = self.net.taps(y)
        return sum(feature_distance(a, b, w) for a, b, w in zip(fx, fy, self._heads(len(fx))))


DISTANCES = ("l2", "feature", "lpips", "elatentlpips")


def build_distance(kind: str, *, channels: int, resolution: int, feature_net: Optional[str] = None,
                   config_key: str = "mid.feature_net", cache_dir: str | Path | None = None) -> nn.Module:
    """The distance module for a loss name; ``feature_net`` is the weights file named by ``config_key``.

    - ``l2``: mean squared error per sample.
    - ``feature``: the digits GN-VGG (trained once and cached; ``feature_net`` overrides it with a file
      from :func:`save_feature_net`), no learned heads, no augmentation.
    - ``elatentlpips``: a GN-VGG trained on the latents (``python -m engine.train_feature_net``), no heads,
      the same random flip/translation on both inputs.
    - ``lpips``: VGG16 on pixels in [-1, 1] (``feature_net`` = torchvision's VGG16 weights) with the lpips
      package's v0.1 heads; grey images are repeated to RGB; needs ≥16 px (relu5_3 is at 1/16 resolution).
    All per-tap distances go through the fused ``kernels.feature_distance`` op.
    """
    if kind == "l2":
        return L2Distance()
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance '{kind}': choose one of {', '.join(DISTANCES)}")
    if kind in ("lpips", "elatentlpips") and not feature_net:
        raise ConfigError(f"loss '{kind}' needs a local weights file: set {config_key} to its path "
                          "(nothing can be downloaded at run time)")
    if feature_net and not Path(feature_net).is_file():
        what = VGG16_HINT if kind == "lpips" else TRAIN_HINT
        raise FileNotFoundError(f"{config_key}='{feature_net}' does not exist: {what}")
    if kind == "lpips":
        if resolution < 16:
            raise ConfigError(f"loss 'lpips' needs images of at least 16x16 (VGG16 pools 4 times before relu5_3), "
                              f"got {resolution}: use loss 'feature' or 'elatentlpips' for small images")
        net = LPIPSVGG16(load_lpips_vgg16(feature_net), in_channels=channels)
        return PerceptualDistance(net, weights=lpips_heads())
    if kind == "feature":
        if feature_net:
            net = load_feature_net(feature_net)
        elif channels != 1:
            raise ConfigError(f"loss 'feature' without {config_key} uses the digits GN-VGG (1 channel), but the "
                              f"data has {channels} channels: set {config_key} to a GN-VGG trained on your data")
        else:
            net = get_digits_feature_net(resolution, cache_dir)
    else:
        net = load_feature_net(feature_net)
    if net.arch["in_channels"] != channels:
        raise ConfigError(f"{config_key}='{feature_net}' takes {net.arch['in_channels']}-channel inputs, "
                          f"the data has {channels}")
    return PerceptualDistance(net, augment=kind == "elatentlpips")
