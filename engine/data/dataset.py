"""Training data in memory: the embedded digits and user images or latents, all as one ImageDataset.

An unreadable image file (data.on_corrupt) fails by name, or with "skip" stands in for the next readable
file in sorted order (cyclically; label included) and is counted in ``dataset.skipped``. engine/data/dali.py
(data.loader=dali) decodes the same files per batch and gives the same batches, skips included.

Labels: data.labels_path (a `.npy`, any source), or a folder's or zip's ``dataset.json`` (the EDM/StyleGAN
dataset_tool layout); with ``num_classes`` (network.num_classes) > 0 they must exist and lie in [0, num_classes).
A folder or zip of `.npy` files (EDM2's latent zips) is read by engine/data/latents.py's ``read_latent_entry``.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.latents import read_latent_entry
from engine.data.sources import (DIGITS_SPLIT_SEED, DIGITS_TRAIN_SIZE, DataFiles, checked_npy, check_labels,
                                 check_source_config, decode_image, digits_arrays, load_labels, next_good,
                                 report_skipped)
from engine.errors import CorruptFileError, DataError


class ImageDataset:
    """Images [N,C,H,W] float32 and optional labels [N] int64: what every source builds.

    Everything lives in memory (N·C·H·W·4 bytes), so training draws batches with :meth:`gather`
    instead of a worker-based DataLoader.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, skipped: list[str] | None = None):
        self.skipped = list(skipped or [])   # unreadable files replaced by the next readable one (on_corrupt=skip)
        if images.ndim != 4:
            raise DataError(f"images must be [N,C,H,W], got shape {tuple(images.shape)}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise DataError(f"{labels.numel()} labels for {images.shape[0]} images: give one label per image")
        self.images = images.float().contiguous()
        self.labels = None if labels is None else labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    @property
    def num_classes(self) -> int | None:
        """Number of label values (max label + 1), or None when unlabeled."""
        return None if self.labels is None else int(self.labels.max()) + 1

    def gather(self, indices: torch.Tensor, flip: torch.Tensor | None = None):
        """(images [B,C,H,W], labels [B] or None) for `indices`, mirrored left-right where `flip` is True."""
        images = self.images[indices]
        if flip is not None:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = None if self.labels is None else self.labels[indices]
        return images, labels

def build_training_data(data_cfg, num_classes: int = 0):
    """The trainer's data from the `data.*` config: an ImageDataset (loader=torch) or a DALI source with the
    same ``len``/``gather`` (loader=dali, engine/data/dali.py); both give the same batches for the same seed.
    num_classes: network.num_classes, which the labels must fit (0: unconditional, labels unused)."""
    kwargs = dict(resolution=data_cfg.resolution, channels=data_cfg.channels, layout=data_cfg.layout,
                  labels_path=data_cfg.labels_path, on_corrupt=data_cfg.on_corrupt)
    if data_cfg.loader != "dali":
        return build_dataset(data_cfg.source, data_cfg.path, split="train", num_classes=num_classes, **kwargs)
    from engine.data.dali import build_dali_dataset
    check_source_config(data_cfg.source, data_cfg.path, "train", data_cfg.labels_path)
    where, labels, item = f"data.path '{data_cfg.path}'", None, lambda i: f"item {i} of '{data_cfg.path}'"
    if data_cfg.source in ("folder", "zip"):
        with DataFiles(data_cfg.source, Path(data_cfg.path)) as files:
            if files.kind == "npy":
                raise DataError(f"data.loader=dali decodes image files, but {where} holds .npy files: "
                                f"set data.loader=torch")
            labels, item = _labels_of(files, data_cfg.labels_path), _namer(files)
    dataset = build_dali_dataset(data_cfg.source, data_cfg.path, **kwargs)
    if labels is not None:
        dataset.labels = labels           # DALI's source reads data.labels_path, not dataset.json
    check_labels(dataset.labels, num_classes, where, item)
    return dataset

def build_dataset(source: str, path: str | None = None, resolution: int = 16, channels: int = 1,
                  split: str = "train", layout: str = "NCHW", labels_path: str | None = None,
                  on_corrupt: str = "fail", num_classes: int = 0) -> ImageDataset:
    """Build the dataset named by the `data.*` config keys.

    source: "digits" (embedded, needs no path), "folder" (png/jpg, or .npy latents, found recursively, sorted
    by relative path), "zip" (the same inside a zip) or "npy" (an array [N,C,H,W], or [N,H,W,C] with
    layout="NHWC", values kept as stored). Images must already be resolution×resolution with `channels`
    channels (grayscale = 1, RGB = 3): nothing is resized silently (cmt-prepare makes such a set). labels_path:
    optional `.npy` of N integers in the same (sorted) order; a folder or zip may instead carry dataset.json
    labels. split: "train" or "heldout", for digits only. on_corrupt: "fail" (DataError naming the unreadable
    file) or "skip" (it stands in for the next readable file, see :func:`next_good`). num_classes: the
    network's classes, which the labels must fit (0: any labels, or none); checked before anything is decoded.
    """
    check_source_config(source, path, split, labels_path)
    where = f"data.path '{path}'"
    if source == "digits":
        data = _digits(resolution, channels, split)
        check_labels(data.labels, num_classes, "the digits", lambda i: f"digit {i}")
        return data
    skipped = []
    if source == "npy":
        images = _load_npy(Path(path), resolution, channels, layout)
        labels = None if labels_path is None else load_labels(Path(labels_path), len(images))
        check_labels(labels, num_classes, where, lambda i: f"item {i} of '{path}'")
    else:
        with DataFiles(source, Path(path)) as files:
            labels = _labels_of(files, labels_path)
            check_labels(labels, num_classes, where, _namer(files))
            decode = decode_image if files.kind == "image" else read_latent_entry
            images, skipped = _decode_all(files.entries(), decode, resolution, channels, on_corrupt)
    if skipped:
        bad = {index for index, _ in skipped}
        order = torch.tensor([next_good(i, bad, len(images)) for i in range(len(images))])
        filler = next(image for image in images if image is not None)
        images = torch.stack([image if image is not None else filler for image in images])
        images, labels = images[order], (None if labels is None else labels[order])
        report_skipped([name for _, name in skipped], len(skipped))
    elif source != "npy":
        images = torch.stack(images)
    return ImageDataset(images, labels, skipped=[name for _, name in skipped])

def _labels_of(files: DataFiles, labels_path: str | None) -> torch.Tensor | None:
    """A folder's or zip's labels: its dataset.json's or data.labels_path's (not both), or None."""
    labels = files.labels()
    if labels is not None and labels_path is not None:
        raise DataError(f"data.path '{files.path}' has dataset.json labels and data.labels_path is set too: "
                        f"remove data.labels_path, or give the dataset.json \"labels\": null")
    if labels_path is not None:
        return load_labels(Path(labels_path), len(files.names))
    return None if labels is None else torch.from_numpy(labels)

def _namer(files: DataFiles):
    return lambda i: files.display(files.names[i])

def _digits(resolution: int, channels: int, split: str) -> ImageDataset:
    """The fixed 1500/297 split, upsampled bilinearly from 8×8 (convex weights keep values in [-1,1])."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: the digits have a 'train' and a 'heldout' split")
    if channels != 1:
        raise DataError(f"data.channels={channels} but the digits are grayscale: set data.channels=1")
    if resolution < 8:
        raise DataError(f"data.resolution={resolution} is below the digits' native 8×8: use 8 or more")
    pixels, targets = digits_arrays()
    # The legacy RandomState stream is frozen across numpy versions, so the split never moves.
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(pixels))
    chosen = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
    images = torch.from_numpy(pixels[chosen]).float()[:, None] / 8.0 - 1.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return ImageDataset(images, torch.from_numpy(targets[chosen]))

def _decode_all(entries, decode, resolution: int, channels: int, on_corrupt: str):
    """Decode every (name, open_bytes) entry with `decode` (decode_image or read_latent_entry): ([C,H,W] tensors,
    None where skipped), [(index, name) skipped]. The first good entry is named beside any misfit (mixed sizes)."""
    images, skipped, like = [], [], None
    for index, (name, open_bytes) in enumerate(entries):
        try:
            images.append(decode(name, open_bytes, resolution, channels, like=like))
            like = like or name
        except CorruptFileError:
            if on_corrupt != "skip":
                raise
            images.append(None)
            skipped.append((index, name))
    if len(skipped) == len(images):
        next_good(0, set(range(len(images))), len(images))   # raises: nothing readable
    return images, skipped

def _load_npy(file: Path, resolution: int, channels: int, layout: str) -> torch.Tensor:
    array = checked_npy(file, resolution, channels, layout)
    if layout == "NHWC":
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
