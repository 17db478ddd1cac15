"""Fréchet distance between image sets in the features of the digits CNN (engine/eval/digits_cnn.py).

This is NOT Inception FID and its numbers are not comparable with published FIDs: it is the same
formula, ‖μa−μb‖² + tr(Σa + Σb − 2(ΣaΣb)^½), in the 64-d features of a small classifier trained on the
embedded digits, hence the result key `fd_digits_cnn`.

The estimate is biased upward by a finite sample (covariance noise adds a term that shrinks like 1/n), so
distances are only comparable at equal sample counts. The floor, the distance of the 297 held-out real
digits to the 1500 train digits, is therefore matched by `fd_digits_cnn_297`, computed on the first 297
generated images; `fd_digits_cnn` on all of them is lower for the same model when more images are given.
"""

import functools
from pathlib import Path

import numpy as np
import torch

from engine.data.dataset import build_dataset
from engine.errors import DataError
from engine.eval.digits_cnn import FeatureNet, cache_path, get_feature_net

METRIC_NAME = "fd_digits_cnn"
FLOOR_SAMPLE_COUNT = 297  # the size of the digits held-out split


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D,D]) in float64 of features [N,D], N ≥ 2 (unbiased covariance)."""
    features = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N,D] with N ≥ 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) -> float:
    """Fréchet distance of two Gaussians.

    tr((ΣaΣb)^½) is taken as Σ√λ of the symmetric PSD matrix Σa^½ Σb Σa^½, which has the same
    eigenvalues as ΣaΣb: two symmetric eigendecompositions, no complex parts from a general sqrtm on
    a non-symmetric product. Eigenvalues below zero are rounding noise of singular covariances and
    clipped; so is a result a hair below zero.
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = _symmetric(np.asarray(cov_a, np.float64)), _symmetric(np.asarray(cov_b, np.float64))
    sqrt_a = _psd_sqrt(cov_a)
    eigenvalues = np.linalg.eigvalsh(_symmetric(sqrt_a @ cov_b @ sqrt_a))
    trace_sqrt_product = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    mean_term = float(np.sum((mean_a - mean_b) ** 2))
    return max(0.0, mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product))


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [Na,D] and [Nb,D]."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


@torch.no_grad()
def extract_features(images: torch.Tensor, net: FeatureNet, batch_size: int = 500) -> torch.Tensor:
    """Features [N,64] of images [N,1,R,R], clamped to [-1,1] as they would be when saved as pictures."""
    images = images.detach().float().cpu().clamp(-1.0, 1.0)
    return torch.cat([net.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@functools.lru_cache(maxsize=4)
def _reference(resolution: int, net_file: Path):
    """(net, train statistics, held-out features), computed once per process for a cached net."""
    net = get_feature_net(resolution, net_file.parent)
    train = build_dataset("digits", resolution=resolution, split="train")
    heldout = build_dataset("digits", resolution=resolution, split="heldout")
    return net, feature_statistics(extract_features(train.images, net)), extract_features(heldout.images, net)


def digits_reference(resolution: int = 16, cache_dir: str | Path | None = None):
    """(digits feature net, (mu, sigma) of the digits train split): fd_digits_cnn's detector and reference."""
    net, train_statistics, _ = _reference(resolution, cache_path(resolution, cache_dir))
    return net, train_statistics


def reference_floor(resolution: int = 16, cache_dir: str | Path | None = None) -> float:
    """The distance of the 297 held-out real digits to the train split: what a perfect model scores at 297."""
    _, train_statistics, heldout_features = _reference(resolution, cache_path(resolution, cache_dir))
    return frechet_distance_from_statistics(*train_statistics, *feature_statistics(heldout_features))


def evaluate_images(images: torch.Tensor, resolution: int = 16, cache_dir: str | Path | None = None) -> dict:
    """Distances of generated digits [N,1,R,R] in [-1,1] to the train split.

    Pass the images in sampling order, not sorted by class: the 297-image figure uses the first 297.

    Keys: `fd_digits_cnn` (all N images), `fd_digits_cnn_297` (first 297 images; only when N ≥ 297),
    `fd_digits_cnn_floor_297` (held-out real digits, same count), `fd_num_images` (N).
    """
    if images.ndim != 4 or images.shape[1:] != (1, resolution, resolution):
        raise ValueError(f"images must be [N,1,{resolution},{resolution}] to match resolution={resolution}, "
                         f"got {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(images)}")
    if not torch.isfinite(images).all():
        raise DataError("the generated images contain NaN or infinite values: the network diverged (look at its "
                        "log.jsonl) or its export is damaged")
    net, train_statistics, _ = _reference(resolution, cache_path(resolution, cache_dir))
    features = extract_features(images, net)
    results = {
        METRIC_NAME: frechet_distance_from_statistics(*train_statistics, *feature_statistics(features)),
        f"{METRIC_NAME}_floor_{FLOOR_SAMPLE_COUNT}": reference_floor(resolution, cache_dir),
        "fd_num_images": len(images),
    }
    if len(images) >= FLOOR_SAMPLE_COUNT:
        head_statistics = feature_statistics(features[:FLOOR_SAMPLE_COUNT])
        results[f"{METRIC_NAME}_{FLOOR_SAMPLE_COUNT}"] = frechet_distance_from_statistics(*train_statistics,
                                                                                          *head_statistics)
    return results
