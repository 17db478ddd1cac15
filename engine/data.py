"""Training data: the embedded digits set and user images/latents, all as one ImageDataset.

Every source returns float32 images [N,C,H,W] (pixels mapped to [-1,1]; `.npy` arrays kept as stored,
since they are usually latents) with optional integer labels. Bad input raises DataError with a one-line
message that names the file or config key and says what to change: the CLI shows it verbatim.

An unreadable image file (data.on_corrupt) fails by name, or with "skip" stands in for the next readable
file in sorted order (cyclically; label included) and is counted in ``dataset.skipped``. engine/data_dali.py
(data.loader=dali) decodes the same files per batch and gives the same batches, skips included.
"""

import functools
import io
import sys
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

SOURCES = ("digits", "folder", "zip", "npy")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUTS = ("NCHW", "NHWC")
LOADERS = ("torch", "dali")
ON_CORRUPT = ("fail", "skip")

DIGITS_TRAIN_SIZE = 1500  # the remaining 297 of the 1797 digits are held out
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "heldout")
DIGITS_NUM_CLASSES = 10

# 8-bit modes the image loaders accept, with the channel count they give; "1" and "P" are widened first.
_MODE_CHANNELS = {"L": 1, "RGB": 3}
_MODE_NAMES = {"L": "grayscale", "RGB": "RGB"}
_WHAT_PATH_HOLDS = {
    "folder": "a folder of .png/.jpg images",
    "zip": "a .zip of .png/.jpg images",
    "npy": "a .npy array [N,C,H,W]",
}


class DataError(ValueError):
    """Bad data or data config; the message is one line that says what to fix."""


class CorruptFileError(DataError):
    """An image file that cannot be read or decoded at all (what data.on_corrupt=skip skips)."""


class ImageDataset(Dataset):
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

    def __getitem__(self, index: int):
        """(image [C,H,W], label); the label is -1 when the dataset has none, so default collation works."""
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label

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


def build_training_data(data_cfg):
    """The trainer's data from the `data.*` config: an ImageDataset (loader=torch) or a DALI source with the
    same ``len``/``gather`` (loader=dali, engine/data_dali.py); both give the same batches for the same seed."""
    loader = getattr(data_cfg, "loader", "torch")
    if loader not in LOADERS:
        raise DataError(f"data.loader {loader!r} is not one of {', '.join(LOADERS)}")
    kwargs = dict(resolution=data_cfg.resolution, channels=data_cfg.channels, layout=data_cfg.layout,
                  labels_path=data_cfg.labels_path, on_corrupt=getattr(data_cfg, "on_corrupt", "fail"))
    if loader == "dali":
        from engine.data_dali import build_dali_dataset
        return build_dali_dataset(data_cfg.source, data_cfg.path, **kwargs)
    return build_dataset(data_cfg.source, data_cfg.path, split="train", **kwargs)


def build_dataset(source: str, path: str | None = None, resolution: int = 16, channels: int = 1,
                  split: str = "train", layout: str = "NCHW", labels_path: str | None = None,
                  on_corrupt: str = "fail") -> ImageDataset:
    """Build the dataset named by the `data.*` config keys.

    source: "digits" (embedded, needs no path), "folder" (png/jpg found recursively, sorted by relative
    path), "zip" (the same inside a zip) or "npy" (an array [N,C,H,W], or [N,H,W,C] with layout="NHWC",
    values kept as stored). Images must already be resolution×resolution with `channels` channels
    (grayscale = 1, RGB = 3): nothing is resized silently. labels_path: optional `.npy` of N integers in
    the same (sorted) order. split: "train" or "heldout", for digits only. on_corrupt: "fail" (DataError
    naming the unreadable file) or "skip" (it stands in for the next readable file, see :func:`next_good`).
    """
    check_source_config(source, path, resolution, channels, split, on_corrupt, labels_path)
    if source == "digits":
        return _digits(resolution, channels, split)
    skipped = []
    if source == "folder":
        images, skipped = _decode_all(_list_folder(Path(path)), resolution, channels, on_corrupt)
    elif source == "zip":
        with _open_zip(Path(path)) as archive:
            images, skipped = _decode_all(_list_zip(Path(path), archive), resolution, channels, on_corrupt)
    else:
        images = _load_npy(Path(path), resolution, channels, layout)
    labels = None if labels_path is None else _load_labels(Path(labels_path), len(images))
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


def check_source_config(source, path, resolution, channels, split="train", on_corrupt="fail",
                        labels_path=None) -> None:
    """The checks every loader makes before reading anything (one-line DataError)."""
    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"data.on_corrupt {on_corrupt!r} is not one of {', '.join(ON_CORRUPT)}")
    if source not in SOURCES:
        raise DataError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")
    if not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"data.resolution={resolution!r} must be a positive integer")
    if not isinstance(channels, int) or channels < 1:
        raise DataError(f"data.channels={channels!r} must be a positive integer")
    if source == "digits":
        if path is not None or labels_path is not None:
            raise DataError("data.source='digits' is embedded and takes no data.path or data.labels_path: remove them")
        return
    if split != "train":
        raise DataError(f"data.split={split!r} exists only for data.source='digits': set data.split='train' for {source}")
    if path is None:
        raise DataError(f"data.path is required for data.source={source!r}: point it at {_WHAT_PATH_HOLDS[source]}")
    if not Path(path).exists():
        raise DataError(f"data.path '{path}' does not exist: point data.path at {_WHAT_PATH_HOLDS[source]}")


def next_good(index: int, bad: set, count: int) -> int:
    """The item that stands in for `index`: itself, or the next index (cyclically) not in `bad`."""
    for step in range(count):
        candidate = (index + step) % count
        if candidate not in bad:
            return candidate
    raise DataError(f"all {count} image files are unreadable (data.on_corrupt=skip): check data.path")


def report_skipped(new_names: list[str], total: int) -> None:
    """One stderr line per batch of newly found unreadable files (data.on_corrupt=skip)."""
    shown = ", ".join(new_names[:3]) + (", ..." if len(new_names) > 3 else "")
    print(f"data: skipped unreadable file(s) {shown} (data.on_corrupt=skip; {total} skipped so far)",
          file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    """The 1797 digits as (images [N,8,8] in 0..16, labels [N]); shipped with scikit-learn, no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _digits(resolution: int, channels: int, split: str) -> ImageDataset:
    """The fixed 1500/297 split, upsampled bilinearly from 8×8 (convex weights keep values in [-1,1])."""
    if split not in DIGITS_SPLITS:
        raise DataError(f"data.split={split!r} is not one of {', '.join(DIGITS_SPLITS)}")
    if channels != 1:
        raise DataError(f"data.channels={channels} but the digits are grayscale: set data.channels=1")
    if resolution < 8:
        raise DataError(f"data.resolution={resolution} is below the digits' native 8×8: use 8 or more")
    pixels, targets = _digits_arrays()
    # The legacy RandomState stream is frozen across numpy versions, so the split never moves.
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(pixels))
    chosen = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
    images = torch.from_numpy(pixels[chosen]).float()[:, None] / 8.0 - 1.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return ImageDataset(images, torch.from_numpy(targets[chosen]))


def _is_image_name(name: str) -> bool:
    """Image extension, skipping macOS metadata (`__MACOSX/`, `._x.png`) that copies and zips pick up."""
    parts = name.split("/")
    return (name.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in parts
            and not parts[-1].startswith("._"))


def _decode_all(entries, resolution: int, channels: int, on_corrupt: str):
    """Decode every (name, open_bytes) entry: ([C,H,W] tensors, None where skipped), [(index, name) skipped]."""
    images, skipped = [], []
    for index, (name, open_bytes) in enumerate(entries):
        try:
            images.append(_decode_image(name, open_bytes, resolution, channels))
        except CorruptFileError:
            if on_corrupt != "skip":
                raise
            images.append(None)
            skipped.append((index, name))
    if len(skipped) == len(images):
        next_good(0, set(range(len(images))), len(images))   # raises: nothing readable
    return images, skipped


def _list_folder(root: Path) -> list:
    """[(name, open_bytes)] of the folder's images, sorted by relative path."""
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is not a folder: point it at a folder of .png/.jpg images "
                        f"(or set data.source to zip/npy)")
    files = sorted((p for p in root.rglob("*") if p.is_file() and _is_image_name(p.relative_to(root).as_posix())),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"data.path '{root}' contains no .png/.jpg images (searched recursively): "
                        f"point data.path at a folder of images")
    return [(str(f), lambda f=f: open(f, "rb")) for f in files]


def _open_zip(archive_path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"data.path '{archive_path}' is not a readable zip ({error}): "
                        f"point it at a .zip of .png/.jpg images") from None


def _list_zip(archive_path: Path, archive: zipfile.ZipFile) -> list:
    """[(name, open_bytes)] of the zip's images, sorted by member name (open_bytes reads from `archive`)."""
    members = sorted(m.filename for m in archive.infolist() if not m.is_dir() and _is_image_name(m.filename))
    if not members:
        raise DataError(f"data.path '{archive_path}' contains no .png/.jpg images: "
                        f"point data.path at a .zip of images")
    return [(f"{archive_path}:{m}", lambda m=m: io.BytesIO(_read_member(archive, archive_path, m))) for m in members]


def _read_member(archive: zipfile.ZipFile, archive_path: Path, member: str) -> bytes:
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as error:
        raise CorruptFileError(f"{archive_path}:{member} cannot be read from the zip ({error}): "
                               f"replace or remove it") from None


def _decode_image(name: str, open_bytes: Callable[[], BinaryIO], resolution: int, channels: int,
                  decode: bool = True) -> torch.Tensor | None:
    """One 8-bit image → [C,H,W] in [-1,1], or DataError naming the file if it is unreadable or mis-sized
    (CorruptFileError if unreadable). decode=False checks only the header (mode and size) and returns None."""
    try:
        with open_bytes() as stream, Image.open(stream) as image:
            mode = {"1": "L", "P": "RGB"}.get(image.mode, image.mode)   # "1" and "P" are widened
            if decode:
                image.load()
                if image.mode != mode:
                    image = image.convert(mode)
            width, height = image.size
            pixels = np.asarray(image) if decode and mode in _MODE_CHANNELS else None
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CorruptFileError(f"{name} cannot be read as an image ({error}): replace or remove it") from None
    if mode not in _MODE_CHANNELS:
        raise DataError(f"{name} has image mode {mode}; only 8-bit grayscale (L) and RGB are read: "
                        f"convert it (e.g. PIL image.convert('RGB'))")
    if (width, height) != (resolution, resolution) or _MODE_CHANNELS[mode] != channels:
        raise DataError(f"{name} is {width}×{height} {_MODE_NAMES[mode]} but data.resolution={resolution}, "
                        f"data.channels={channels}: resize the images or change the config")
    if not decode:
        return None
    tensor = torch.from_numpy(pixels.copy()).float().div_(127.5).sub_(1.0)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _load_npy(file: Path, resolution: int, channels: int, layout: str) -> torch.Tensor:
    array = checked_npy(file, resolution, channels, layout)
    if layout == "NHWC":
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def checked_npy(file: Path, resolution: int, channels: int, layout: str, mmap_mode: str | None = None) -> np.ndarray:
    """The `.npy` array as stored (layout unchanged), after every check the npy source makes."""
    if layout not in LAYOUTS:
        raise DataError(f"data.layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    array = _read_npy(file, "data.path", mmap_mode)
    if array.ndim != 4:
        raise DataError(f"{file} has shape {array.shape} but data.source='npy' needs a 4-d array "
                        f"[N,C,H,W] (or [N,H,W,C] with data.layout=NHWC)")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{file} holds {array.dtype} values but the npy source keeps values as stored "
                        f"(for latents): save floats (pixels in [-1,1]) or use data.source=folder")
    expected = (channels, resolution, resolution)
    if (array.shape[1:] if layout == "NCHW" else array.shape[1:][2:] + array.shape[1:3]) != expected:
        shape = array.shape[1:] if layout == "NCHW" else array.shape[1:][2:] + array.shape[1:3]
        raise DataError(f"{file} holds items of shape {list(shape)} (C,H,W after layout {layout}) "
                        f"but data.channels={channels}, data.resolution={resolution} expect {list(expected)}: "
                        f"fix the array, data.layout or the config")
    if len(array) == 0:
        raise DataError(f"{file} holds no items: point data.path at a non-empty array")
    chunk = max(1, (1 << 24) // max(1, array[0].size))   # ~16M values at a time: a memory map stays small
    if not all(np.isfinite(array[i:i + chunk]).all() for i in range(0, len(array), chunk)):
        raise DataError(f"{file} contains NaN or infinite values: clean the array")
    return array


def _load_labels(file: Path, count: int) -> torch.Tensor:
    labels = _read_npy(file, "data.labels_path")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file} has shape {labels.shape} and dtype {labels.dtype}: labels must be a 1-d "
                        f"integer array")
    if len(labels) != count:
        raise DataError(f"{file} has {len(labels)} labels but the data has {count} items: "
                        f"give exactly one label per item, in sorted file order")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{file} contains negative labels: use class indices 0..K-1")
    return torch.from_numpy(labels.astype(np.int64))


def _read_npy(file: Path, key: str, mmap_mode: str | None = None) -> np.ndarray:
    if not file.is_file():
        raise DataError(f"{key} '{file}' does not exist or is not a file: point it at a .npy file")
    try:
        return np.load(file, allow_pickle=False, mmap_mode=mmap_mode)
    except (OSError, ValueError) as error:
        raise DataError(f"{key} '{file}' cannot be read as a .npy array ({error}): save it with numpy.save") from None


class SampledBatch(NamedTuple):
    """Indices into the dataset and, with random_flip, which of them to mirror (else None)."""
    indices: torch.Tensor
    flip: torch.Tensor | None


class InfiniteSampler:
    """Batches of shuffled indices forever: a new seeded permutation each epoch, batches run across epochs.

    The position (epoch, index into that epoch's permutation) is all the state there is, so a run resumed
    from :meth:`state_dict` draws exactly the batches it would have drawn (also with another batch size).
    Each epoch's permutation and flip bits depend only on (seed, epoch). Draw batches directly
    (`dataset.gather(*next(sampler))`); a prefetching DataLoader would move the position ahead of training.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, random_flip: bool = False):
        if num_items < 1:
            raise DataError("the dataset is empty: nothing to sample")
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be positive")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self.epoch = 0
        self.index = 0
        self._epoch_order = None  # (epoch, permutation, flip bits) of the current epoch

    def __iter__(self):
        return self

    def __next__(self) -> SampledBatch:
        indices, flips = [], []
        remaining = self.batch_size
        while remaining:
            permutation, flip = self._order(self.epoch)
            take = min(remaining, self.num_items - self.index)
            indices.append(permutation[self.index:self.index + take])
            flips.append(flip[self.index:self.index + take])
            remaining -= take
            self.index += take
            if self.index == self.num_items:
                self.epoch, self.index = self.epoch + 1, 0
        flip = torch.from_numpy(np.concatenate(flips)) if self.random_flip else None
        return SampledBatch(torch.from_numpy(np.concatenate(indices)), flip)

    def _order(self, epoch: int):
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_order = (epoch, rng.permutation(self.num_items), rng.random(self.num_items) < 0.5)
        return self._epoch_order[1:]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items:
            raise DataError(f"the checkpoint's sampler covered {state['num_items']} items but the dataset has "
                            f"{self.num_items}: resume with the same data")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
