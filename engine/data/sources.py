"""Reading the files a dataset is made of: image folders and zips, `.npy` arrays, label files, the digits.

Every reader checks what it reads and raises a one-line DataError that names the file or config key and
says what to change: the command line shows it verbatim. Images come out as float32 [C, H, W] in [-1, 1];
`.npy` arrays are kept as stored (they are usually latents).

A folder or zip is read in the layout of the EDM/StyleGAN ``dataset_tool.py`` (what ``cmt-prepare`` writes):
images (or EDM2's `.npy` latents, one file per item) under any sub-folders, sorted by relative path, and
an optional ``dataset.json`` at the top, ``{"labels": [["00000/img00000000.png", 6], ...]}`` or
``{"labels": null}``, giving each file its class (docs/datasets.md).
"""
import functools
import json
from io import BytesIO
import sys
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image

from engine.errors import CorruptFileError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NPY_EXTENSION = ".npy"
DATASET_JSON = "dataset.json"

DIGITS_TRAIN_SIZE = 1500  # the remaining 297 of the 1797 digits are held out
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_CLASSES = 10

# 8-bit modes the image loaders accept, with the channel count they give; "1" and "P" are widened first.
_MODE_CHANNELS = {"L": 1, "RGB": 3}
_MODE_NAMES = {"L": "grayscale", "RGB": "RGB"}
_CHANNEL_MODES = {1: "L", 3: "RGB"}
_WHAT_PATH_HOLDS = {
    "folder": "a folder of .png/.jpg images (or .npy latents)",
    "zip": "a .zip of .png/.jpg images (or .npy latents), as cmt-prepare or EDM's dataset_tool.py write",
    "npy": "a .npy array [N,C,H,W]",
}


def check_source_config(source: str, path, split: str = "train", labels_path=None) -> None:
    """The checks every loader makes before reading anything (one-line DataError). The choices themselves
    (source, layout, on_corrupt) are checked by the config."""
    if source == "digits":
        if path is not None or labels_path is not None:
            raise DataError("data.source='digits' is embedded and takes no data.path or data.labels_path: remove them")
        return
    if split != "train":
        raise DataError(f"data.split={split!r} exists only for data.source='digits': set data.split='train' "
                        f"for {source}")
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
def digits_arrays():
    """The 1797 digits as (images [N,8,8] in 0..16, labels [N]); shipped with scikit-learn, no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def is_image_name(name: str) -> bool:
    """Image extension, skipping macOS metadata (`__MACOSX/`, `._x.png`) that copies and zips pick up."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not _is_metadata(name)

def is_npy_name(name: str) -> bool:
    return name.lower().endswith(NPY_EXTENSION) and not _is_metadata(name)

def _is_metadata(name: str) -> bool:
    parts = name.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._")

def folder_names(root: Path) -> list[str]:
    """Relative (posix) names of every file under `root`, sorted."""
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is not a folder: point it at a folder of .png/.jpg images "
                        f"(or set data.source to zip/npy)")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

def list_folder(root: Path) -> list:
    """[(name, open_bytes)] of the folder's images, sorted by relative path."""
    names = [n for n in folder_names(root) if is_image_name(n)]
    if not names:
        raise DataError(f"data.path '{root}' contains no .png/.jpg images (searched recursively): "
                        f"point data.path at a folder of images")
    return [(str(root / n), lambda f=root / n: open(f, "rb")) for n in names]

def open_zip(archive_path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"data.path '{archive_path}' is not a readable zip ({error}): "
                        f"point it at a .zip of .png/.jpg images") from None

def zip_names(archive: zipfile.ZipFile) -> list[str]:
    return sorted(m.filename for m in archive.infolist() if not m.is_dir())

def list_zip(archive_path: Path, archive: zipfile.ZipFile) -> list:
    """[(name, open_bytes)] of the zip's images, sorted by member name (open_bytes reads from `archive`)."""
    members = [n for n in zip_names(archive) if is_image_name(n)]
    if not members:
        raise DataError(f"data.path '{archive_path}' contains no .png/.jpg images: "
                        f"point data.path at a .zip of images")
    return [(f"{archive_path}:{m}", lambda m=m: BytesIO(read_member(archive, archive_path, m))) for m in members]

def read_member(archive: zipfile.ZipFile, archive_path: Path, member: str) -> bytes:
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as error:
        raise CorruptFileError(f"{archive_path}:{member} cannot be read from the zip ({error}): "
                               f"replace or remove it") from None


class DataFiles:
    """The data files of a folder or zip (data.source folder/zip), sorted by relative name: images, or `.npy`
    arrays (``kind`` "image" or "npy"; one dataset holds one kind), and the labels of its ``dataset.json``."""

    def __init__(self, source: str, path: Path):
        self.path = path
        self.archive = open_zip(path) if source == "zip" else None
        every = zip_names(self.archive) if self.archive is not None else folder_names(path)
        images, arrays = [n for n in every if is_image_name(n)], [n for n in every if is_npy_name(n)]
        if (images and arrays) or not (images or arrays):
            self.__exit__()
            if images:
                raise DataError(f"data.path '{path}' holds both images ({images[0]}) and .npy files ({arrays[0]}): "
                                f"a dataset is one or the other; move one kind elsewhere")
            raise DataError(f"data.path '{path}' contains no .png/.jpg images or .npy arrays (searched recursively): "
                            f"point data.path at {_WHAT_PATH_HOLDS[source]}")
        self.kind = "npy" if arrays else "image"
        self.names = images or arrays
        self._has_json = DATASET_JSON in every

    def __enter__(self) -> "DataFiles":
        return self

    def __exit__(self, *exc) -> None:
        if self.archive is not None:
            self.archive.close()

    def display(self, name: str) -> str:
        """How messages name a file: its path, or zip:member."""
        return f"{self.path}:{name}" if self.archive is not None else str(self.path / name)

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        if self.archive is not None:
            return lambda: BytesIO(read_member(self.archive, self.path, name))
        return lambda: open(self.path / name, "rb")

    def entries(self) -> list:
        """[(display name, open_bytes)] in sorted order, what the decoders take."""
        return [(self.display(n), self.opener(n)) for n in self.names]

    def labels(self) -> np.ndarray | None:
        """The classes dataset.json gives the files, in sorted order; None without one (or with null labels)."""
        if not self._has_json:
            return None
        with self.opener(DATASET_JSON)() as stream:
            return parse_dataset_json(stream.read(), self.display(DATASET_JSON), self.names)


def parse_dataset_json(raw: bytes, where: str, names: list[str]) -> np.ndarray | None:
    """The labels of a dataset.json for `names` (in that order), or None for ``"labels": null``; every file must
    have one, every label must name a file there, and labels are class indices 0..K-1."""
    layout = 'write {"labels": [["relative/name.png", class index], ...]} or {"labels": null}'
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{where} is not valid JSON ({error}): {layout}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where} holds a JSON {type(meta).__name__}, not an object: {layout}")
    pairs = meta.get("labels")
    if pairs is None:
        return None
    bad = next((p for p in (pairs if isinstance(pairs, list) else [pairs])
                if not (isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                        and isinstance(p[1], int) and not isinstance(p[1], bool))), None)
    if bad is not None:
        raise DataError(f"{where} has the label entry {json.dumps(bad)[:80]}, not a class index: {layout}")
    by_name = dict(pairs)
    present = set(names)
    unknown = [n for n in by_name if n not in present]
    if unknown:
        raise DataError(f"{where} names '{unknown[0]}', which is not in the dataset ({len(unknown)} such): "
                        f"remove those labels or restore the files")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"{where} has no label for '{missing[0]}' ({len(missing)} files unlabeled): "
                        f"label every file, or write {{\"labels\": null}} for unlabeled data")
    labels = np.array([by_name[n] for n in names], dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where} labels '{names[int(labels.argmin())]}' {labels.min()}: use class indices 0..K-1")
    return labels

def check_labels(labels: torch.Tensor | None, num_classes: int, where: str, item: Callable[[int], str]) -> None:
    """Labels fit a class-conditional network (network.num_classes > 0): present, each in [0, num_classes).
    `item(i)` names item i in the message. An unconditional network (0) ignores labels, so anything goes."""
    if num_classes == 0:
        return
    if labels is None:
        raise DataError(f"network.num_classes={num_classes} but {where} has no labels: add a dataset.json with "
                        f"labels (cmt-prepare writes one) or data.labels_path, or set network.num_classes=0")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        first = int(bad[0])
        raise DataError(f"{item(first)} has label {int(labels[first])}, outside [0, {num_classes}) for "
                        f"network.num_classes={num_classes} ({len(bad)} such): fix the labels or network.num_classes")

def decode_image(name: str, open_bytes: Callable[[], BinaryIO], resolution: int, channels: int,
                  decode: bool = True, like: str | None = None) -> torch.Tensor | None:
    """One 8-bit image → [C,H,W] in [-1,1], or DataError naming the file if it is unreadable or mis-sized
    (CorruptFileError if unreadable). decode=False checks only the header (mode and size) and returns None.
    like: an earlier file of the same dataset that fitted the config, named beside a misfit (mixed sizes)."""
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
        if like is not None:
            raise DataError(f"{name} is {width}×{height} {_MODE_NAMES[mode]} but {like} is {resolution}×{resolution} "
                            f"{_MODE_NAMES[_CHANNEL_MODES[channels]]} (data.resolution={resolution}, data.channels="
                            f"{channels}): the images of one dataset share one size and mode; resize them with "
                            f"cmt-prepare (docs/datasets.md)")
        raise DataError(f"{name} is {width}×{height} {_MODE_NAMES[mode]} but data.resolution={resolution}, "
                        f"data.channels={channels}: resize the images or change the config")
    if not decode:
        return None
    tensor = torch.from_numpy(pixels.copy()).float().div_(127.5).sub_(1.0)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)

def decode_array(name: str, open_bytes: Callable[[], BinaryIO]) -> np.ndarray:
    """One `.npy` file of a folder or zip, as stored: a finite float array [C,H,W] (CorruptFileError if unreadable)."""
    try:
        with open_bytes() as stream:
            array = np.load(stream, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CorruptFileError(f"{name} cannot be read as a .npy array ({error}): replace or remove it") from None
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{name} holds {array.dtype} of shape {list(array.shape)}; each .npy file of a folder or zip "
                        f"is one item, a float array [C,H,W] (for one [N,C,H,W] array use data.source=npy)")
    if not np.isfinite(array).all():
        raise DataError(f"{name} contains NaN or infinite values: replace it")
    return array

def checked_npy(file: Path, resolution: int, channels: int, layout: str, mmap_mode: str | None = None) -> np.ndarray:
    """The `.npy` array as stored (layout unchanged), after every check the npy source makes."""
    array = read_npy(file, "data.path", mmap_mode)
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

def load_labels(file: Path, count: int) -> torch.Tensor:
    labels = read_npy(file, "data.labels_path")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file} has shape {labels.shape} and dtype {labels.dtype}: labels must be a 1-d "
                        f"integer array")
    if len(labels) != count:
        raise DataError(f"{file} has {len(labels)} labels but the data has {count} items: "
                        f"give exactly one label per item, in sorted file order")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{file} contains negative labels: use class indices 0..K-1")
    return torch.from_numpy(labels.astype(np.int64))

def read_npy(file: Path, key: str, mmap_mode: str | None = None) -> np.ndarray:
    if not file.is_file():
        raise DataError(f"{key} '{file}' does not exist or is not a file: point it at a .npy file")
    try:
        return np.load(file, allow_pickle=False, mmap_mode=mmap_mode)
    except (OSError, ValueError) as error:
        raise DataError(f"{key} '{file}' cannot be read as a .npy array ({error}): save it with numpy.save") from None
