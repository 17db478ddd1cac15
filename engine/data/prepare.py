"""Dataset preparation: images as they come (of any size) → a dataset zip or folder that data.source zip/folder reads.

    cmt-prepare --source DIR_ZIP_OR_CIFAR --dest OUT.zip [--resolution N --transform resize|adm-crop] [--max-images N]

The output is the layout of the EDM/StyleGAN ``dataset_tool.py``: ``00000/img00000000.png``, ... (1000 per
folder, in the sorted order of the source) and ``dataset.json`` = ``{"labels": [["00000/img00000000.png", 6],
...]}`` or ``{"labels": null}``; a ``--dest`` ending in ``.zip`` is an uncompressed zip (PNGs inside are
compressed at ``--compress-level``; 0, the default, as EDM/EDM2 store them, reads fastest), anything else a
folder. Labels (``--labels auto``) come from a ``dataset.json`` in the source, else from class sub-folders
(ImageNet's ``train/nXXXXXXXX/`` layout, indexed in sorted order), else none. The source may also be CIFAR-10's
binary version (a folder holding ``data_batch_1.bin`` ... ``data_batch_5.bin``: the 50,000 training images).

Transforms (to ``--resolution``): ``resize`` scales square images with PIL's Lanczos filter, which is
antialiased (its kernel widens with the reduction, so 1024→64 does not alias) and keeps edges sharper than
box or bilinear filtering: FFHQ, AFHQv2, CIFAR-10. ``adm-crop`` is ADM's ImageNet preprocessing (Dhariwal &
Nichol 2021, guided-diffusion's ``center_crop_arr``, used by EDM and EDM2): halve with a box filter while the
short side is at least twice the target, resize with bicubic so the short side is the target, then cut the
centre square. ``none`` keeps the images as they are (they must then share one size).

Nothing half-written is ever left at ``--dest``: the output is written under a temporary name beside it and
renamed at the end (an interrupted run leaves the old ``--dest``, if any, untouched).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.sources import DATASET_JSON, is_image_name, parse_dataset_json
from engine.errors import ConfigError, CorruptFileError, DataError

TRANSFORMS = ("none", "resize", "adm-crop")
LABELS = ("auto", "none")
PER_FOLDER = 1000   # images per sub-folder of the output, as dataset_tool.py
CIFAR_RECORD = 1 + 3 * 32 * 32   # CIFAR-10 binary: a label byte, then the R, G and B planes of 32×32, row-major
# Zip entries get a fixed date, so preparing the same source twice gives the same bytes (and file identity).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ImageSource:
    """Sorted image names in a folder (recursive) or zip, with their labels, read one at a time at any size.

    labels: from a ``dataset.json`` at the top (``label_origin`` "dataset.json"), else from class sub-folders
    when every image is in one ("class folders": the sorted folder names are classes 0..K-1), else None.
    """

    def __init__(self, path: str | Path, flag: str = "--images"):
        self.path, self.flag = Path(path), flag
        if not self.path.exists():
            raise DataError(f"{flag} '{self.path}' does not exist: pass a folder or .zip of .png/.jpg images")
        if self.path.is_dir():
            self.zip = None
            every = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        else:
            try:
                self.zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise DataError(f"{flag} '{self.path}' is neither a folder nor a .zip") from None
            every = self.zip.namelist()
        self.names = sorted(n for n in every if is_image_name(n))
        if not self.names:
            raise DataError(f"{flag} '{self.path}' holds no .png/.jpg images (searched recursively)")
        self.labels, self.label_origin = self._labels(DATASET_JSON in every)

    def _read(self, name: str) -> bytes:
        return self.zip.read(name) if self.zip is not None else (self.path / name).read_bytes()

    def _labels(self, has_json: bool) -> tuple[np.ndarray | None, str | None]:
        if has_json:
            labels = parse_dataset_json(self._read(DATASET_JSON), f"{self.path}/{DATASET_JSON}", self.names)
            return labels, None if labels is None else DATASET_JSON
        folders = [n.split("/")[0] if "/" in n else None for n in self.names]
        if any(f is None for f in folders):
            return None, None
        classes = {f: i for i, f in enumerate(sorted(set(folders)))}
        return np.array([classes[f] for f in folders], dtype=np.int64), "class folders"

    def __len__(self) -> int:
        return len(self.names)

    def open(self, index: int, mode: str = "RGB") -> Image.Image:
        """Image `index`, decoded and converted to `mode`; CorruptFileError naming it if it cannot be read."""
        name = self.names[index]
        try:
            with Image.open(io.BytesIO(self._read(name))) as image:
                return image.convert(mode)
        except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise CorruptFileError(f"'{name}' in '{self.path}' cannot be read as an image ({exc}): "
                                   f"replace or remove it") from None


class CifarBinary:
    """CIFAR-10's binary version: the training batches ``data_batch_1.bin`` ... ``data_batch_5.bin`` of a folder,
    in order (records of one label byte and 3072 pixel bytes, www.cs.toronto.edu/~kriz/cifar.html)."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("data_batch_*.bin"))
        records = []
        for file in files:
            raw = np.fromfile(file, dtype=np.uint8)
            if raw.size == 0 or raw.size % CIFAR_RECORD:
                raise DataError(f"'{file}' is {raw.size} bytes, not a whole number of CIFAR-10 records of "
                                f"{CIFAR_RECORD} bytes: download the binary version again")
            records.append(raw.reshape(-1, CIFAR_RECORD))
        table = np.concatenate(records)
        self.pixels = table[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.labels, self.label_origin = table[:, 0].astype(np.int64), "CIFAR-10 batches"
        counts = [len(r) for r in records]
        self.names = [f"{f.name}[{i}]" for f, n in zip(files, counts) for i in range(n)]

    def __len__(self) -> int:
        return len(self.names)

    def open(self, index: int, mode: str = "RGB") -> Image.Image:
        return Image.fromarray(self.pixels[index]).convert(mode)


def is_cifar_binary(path: Path) -> bool:
    return path.is_dir() and any(path.glob("data_batch_*.bin"))


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``): box-halve while the short side ≥ 2·size, bicubic
    to a short side of exactly `size`, then the centre size×size square (offsets rounded down)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_square(image: Image.Image, size: int, name: str) -> Image.Image:
    """A square image scaled to size×size with Lanczos (see the module docstring for why)."""
    if image.width != image.height:
        raise DataError(f"{name} is {image.width}×{image.height}, not square: --transform resize would distort it; "
                        f"use --transform adm-crop (centre crop) or crop the images first")
    return image.resize((size, size), resample=Image.LANCZOS)


def output_name(index: int, suffix: str = ".png") -> str:
    """The dataset_tool layout's name of item `index`: ``00000/img00000000.png``."""
    return f"{index // PER_FOLDER:05d}/img{index:08d}{suffix}"


class DatasetWriter:
    """Writes a dataset_tool-layout zip or folder under a temporary name beside `dest`; :meth:`commit` renames it
    into place (replacing an old `dest`), :meth:`abort` removes it. Use as a context manager: an exception or
    Ctrl-C aborts, so `dest` is the old one or the whole new one."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.is_zip = dest.suffix.lower() == ".zip"
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        self._remove(self.tmp)
        if self.is_zip:
            self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)
        else:
            self.tmp.mkdir()

    def add(self, name: str, data: bytes) -> None:
        if self.is_zip:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            self.zip.writestr(info, data)
        else:
            (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (self.tmp / name).write_bytes(data)

    def commit(self, labels: list | None) -> Path:
        self.add(DATASET_JSON, json.dumps({"labels": labels}).encode())
        if self.is_zip:
            self.zip.close()
        old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}"
        if self.dest.exists():
            os.replace(self.dest, old)
        os.replace(self.tmp, self.dest)
        self._remove(old)
        return self.dest

    def abort(self) -> None:
        if self.is_zip:
            self.zip.close()
        self._remove(self.tmp)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:
            self.abort()

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass
class Prepared:
    """What :func:`prepare_dataset` wrote."""
    dest: Path
    count: int
    size: tuple[int, int]          # (width, height) of every image
    num_classes: int | None        # None: unlabeled
    label_origin: str | None
    skipped: list[str]


def check_dest(dest: Path, overwrite: bool, source: Path | None = None) -> None:
    """--dest may be written: absent (or --overwrite), and not inside the source it is made from."""
    if dest.exists() and not overwrite:
        raise ConfigError(f"--dest '{dest}' already exists: pass --overwrite to replace it, or choose another --dest")
    if source is not None and source.is_dir() and dest.resolve().is_relative_to(source.resolve()):
        raise ConfigError(f"--dest '{dest}' is inside --source '{source}': a later run would read it as images; "
                          f"write it elsewhere")


def prepare_dataset(source: str | Path, dest: str | Path, *, resolution: int | None = None, transform: str = "none",
                    channels: int = 3, labels: str = "auto", max_images: int | None = None,
                    skip_unreadable: bool = False, overwrite: bool = False, compress_level: int = 0,
                    progress: bool = True) -> Prepared:
    """Write `source` (image folder or zip, or CIFAR-10 binary batches) as a dataset_tool-layout zip or folder at
    `dest`, transformed to `resolution` (see the module docstring); returns what was written."""
    source, dest = Path(source), Path(dest)
    for flag, value, choices in (("--transform", transform, TRANSFORMS), ("--labels", labels, LABELS),
                                 ("--channels", channels, (1, 3))):
        if value not in choices:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(map(str, choices))}")
    if (transform == "none") != (resolution is None):
        raise ConfigError("--resolution and --transform resize|adm-crop go together: give both, or neither to keep "
                          "the images as they are")
    if not 0 <= compress_level <= 9:
        raise ConfigError(f"--compress-level must be 0..9, got {compress_level}")
    check_dest(dest, overwrite, source)
    images = CifarBinary(source) if is_cifar_binary(source) else ImageSource(source, "--source")
    count = len(images) if max_images is None else min(max_images, len(images))
    mode = "RGB" if channels == 3 else "L"
    written, skipped, first = [], [], None      # first: (name, size) of the first image written
    # The bar closes (ending its line) before any error is raised, so the error is a line of its own.
    with DatasetWriter(dest) as out, _progress(count, progress) as bar:
        for index in range(count):
            name = images.names[index]
            bar.update(1)
            try:
                image = images.open(index, mode)
            except CorruptFileError as error:
                if not skip_unreadable:
                    raise CorruptFileError(f"{error}; or pass --skip-unreadable to leave such files out") from None
                skipped.append(name)
                continue
            if transform == "adm-crop":
                image = adm_center_crop(image, resolution)
            elif transform == "resize":
                image = resize_square(image, resolution, name)
            if first is None:
                first = (name, image.size)
            elif image.size != first[1]:
                raise DataError(f"{name} is {image.width}×{image.height} but {first[0]} is {first[1][0]}×{first[1][1]}:"
                                f" one dataset holds one size; pass --resolution N --transform resize|adm-crop")
            buffer = io.BytesIO()
            image.save(buffer, format="png", compress_level=compress_level)
            target = output_name(len(written))
            out.add(target, buffer.getvalue())
            written.append((target, None if images.labels is None else int(images.labels[index])))
        if not written:
            raise DataError(f"--source '{source}': none of its {count} images could be read (--skip-unreadable)")
        keep_labels = labels == "auto" and images.labels is not None
        out.commit([list(pair) for pair in written] if keep_labels else None)
    classes = max(label for _, label in written) + 1 if keep_labels else None
    return Prepared(dest, len(written), first[1], classes, images.label_origin if keep_labels else None, skipped)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="prepare", unit="img", file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
                disable=not enabled)
