"""Distances d(x, y) → [B], one number per sample: what the mid- and post-training losses compare.

- :class:`MeanSquaredError` — mean over pixels of the squared difference (``mid.loss=l2``, paper Eq. 7's
  L2 option, and MeanFlow's regression).
- :class:`L2Norm` — ‖x − y‖₂ over all pixels, not squared (``post.loss=l2``: ECT's distance, docs/method.md §6).
- :class:`PerceptualDistance` — Σ over a frozen feature net's taps of ``kernels.feature_distance`` (a fused
  C++/CUDA op with its PyTorch reference), optionally under the same random flip/translation of both inputs
  (the "E" of ELatentLPIPS): the ``feature``, ``lpips`` and ``elatentlpips`` losses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from engine.errors import ConfigError, MissingFileError
from engine.losses.augment import augment_pair
from engine.losses.feature_nets import TRAIN_HINT, get_digits_feature_net, load_feature_net
from engine.losses.lpips import VGG16_HINT, LPIPSVGG16, load_lpips_vgg16, lpips_heads
from kernels.perceptual import feature_distance


class MeanSquaredError(nn.Module):
    """Mean over all but the batch dim of (x − y)²."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return (x - y).square().flatten(1).mean(dim=1)


class SumSquaredError(nn.Module):
    """Sum over all but the batch dim of (x − y)²: the authors' mid-training l2 (C·H·W × the mean)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return (x - y).square().flatten(1).sum(dim=1)


class L2Norm(nn.Module):
    """‖x − y‖₂ over all but the batch dim (not squared)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return (x - y).flatten(1).norm(dim=1)


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


DISTANCES = ("mean_squared", "sum_squared", "l2_norm", "feature", "lpips", "elatentlpips")


def build_distance(kind: str, *, channels: int, resolution: int, feature_net: Optional[str] = None,
                   config_key: str = "mid.feature_net", cache_dir: str | Path | None = None) -> nn.Module:
    """The distance module for a loss name; ``feature_net`` is the weights file named by ``config_key``.

    - ``mean_squared`` / ``sum_squared`` / ``l2_norm``: :class:`MeanSquaredError` / :class:`SumSquaredError` /
      :class:`L2Norm`.
    - ``feature``: the digits GN-VGG (trained once and cached; ``feature_net`` overrides it with a file
      from :func:`save_feature_net`), no learned heads, no augmentation.
    - ``elatentlpips``: a GN-VGG trained on the latents (``cmt-train-feature-net``), no heads, the same random
      flip/translation on both inputs.
    - ``lpips``: VGG16 on pixels in [-1, 1] (``feature_net`` = torchvision's VGG16 weights) with the lpips
      package's v0.1 heads; grey images are repeated to RGB; needs ≥16 px (relu5_3 is at 1/16 resolution).
    All per-tap distances go through the fused ``kernels.feature_distance`` op.
    """
    if kind == "mean_squared":
        return MeanSquaredError()
    if kind == "sum_squared":
        return SumSquaredError()
    if kind == "l2_norm":
        return L2Norm()
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance '{kind}': choose one of {', '.join(DISTANCES)}")
    if kind in ("lpips", "elatentlpips") and not feature_net:
        raise ConfigError(f"loss '{kind}' needs a local weights file: set {config_key} to its path "
                          "(nothing can be downloaded at run time)")
    if feature_net and not Path(feature_net).is_file():
        what = VGG16_HINT if kind == "lpips" else TRAIN_HINT
        raise MissingFileError(f"{config_key}='{feature_net}' does not exist: {what}")
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
