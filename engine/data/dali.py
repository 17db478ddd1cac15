"""data.loader=dali: NVIDIA DALI decodes, flips and normalises each batch, giving the torch loader's batches.

The index/flip stream stays the trainer's InfiniteSampler (so order, resume and the data position are
unchanged); the indices a rank keeps reach DALI through ``fn.external_source``, so each rank reads and
decodes only its own slice. Images (folder/zip of PNG/JPEG): the encoded bytes go to ``fn.decoders.image``
(device "cpu", or "mixed" = nvJPEG/nvImageCodec on the GPU when CUDA is available), then ``fn.flip``, HWC→CHW
and ``x / 127.5 - 1`` in float32, the exact arithmetic of engine/data/dataset.py. `.npy` latents: the rank's rows of
a memory-mapped array (values as stored, cast to float32), flipped by DALI.

Checks match the torch loader's: each sample's header (mode, size) is read before decoding, so wrong sizes
or channel counts fail with the same one-line DataError. Files are decoded per batch, so an unreadable file
is found when first drawn: data.on_corrupt=fail raises a DataError naming it; skip replaces it by the next
readable file in sorted order (as the torch loader does) and counts it in ``skipped``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engine.data.sources import (check_source_config, checked_npy, decode_image, list_folder, list_zip,
                                 load_labels, next_good, open_zip, report_skipped)
from engine.errors import CorruptFileError, DataError

INSTALL_HINT = ("data.loader=dali needs NVIDIA DALI, which is not installed: pip install -e '.[dali]' "
                "(nvidia-dali-cuda130==2.4.0), or set data.loader=torch")


def _dali():
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    return fn, pipeline_def, types


def default_device_id() -> int | None:
    """This process's GPU (LOCAL_RANK) when CUDA is available, else None (CPU-only pipelines)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else None


def build_dali_dataset(source: str, path: str | None, resolution: int = 16, channels: int = 1,
                       layout: str = "NCHW", labels_path: str | None = None, on_corrupt: str = "fail",
                       device_id: int | None | str = "auto", num_threads: int | None = None):
    """A DALI-backed source for `data.*` (folder, zip or npy), with ImageDataset's ``len`` and ``gather``.

    device_id: a GPU index, None for CPU-only pipelines, "auto" for :func:`default_device_id`.
    """
    _dali()
    if source == "digits":
        raise DataError("data.loader=dali decodes folder/zip/npy data; data.source='digits' is embedded in memory: "
                        "set data.loader=torch")
    check_source_config(source, path, "train", labels_path)
    device_id = default_device_id() if device_id == "auto" else device_id
    num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
    if source == "npy":
        return DaliNpyDataset(Path(path), resolution, channels, layout, labels_path, device_id, num_threads)
    return DaliImageDataset(source, Path(path), resolution, channels, labels_path, on_corrupt, device_id, num_threads)


class _DaliSource:
    """What the two DALI sources share: labels, output conversion, one pipeline built per batch size."""

    def __init__(self, count: int, resolution: int, channels: int, labels_path, device_id, num_threads):
        self.count, self.resolution, self.channels = count, resolution, channels
        self.labels = None if labels_path is None else load_labels(Path(labels_path), count)
        self.device_id, self.num_threads = device_id, num_threads
        self.skipped: list[str] = []
        self.samples_read = 0          # samples this process fetched from disk (its slices only)
        self._pipe, self._pipe_batch = None, 0

    def __len__(self) -> int:
        return self.count

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)

    def _pipeline(self, batch: int):
        if self._pipe is None or batch > self._pipe_batch:
            fn, pipeline_def, types = _dali()
            graph = pipeline_def(self._graph, batch_size=batch, num_threads=self.num_threads,
                                 device_id=self.device_id, exec_async=False, exec_pipelined=False,
                                 prefetch_queue_depth=1)
            self._pipe, self._pipe_batch = graph(fn=fn, types=types), batch
            self._pipe.build()
        return self._pipe

    def _run(self, inputs: dict) -> torch.Tensor:
        """Feed one batch, run, return [B,C,H,W] float32 (on the pipeline's device). After an error DALI's
        pipeline is unusable, so it is dropped and rebuilt on the next call."""
        pipe = self._pipeline(len(next(iter(inputs.values()))))
        try:
            for name, data in inputs.items():
                pipe.feed_input(name, data)
            (out,) = pipe.run()
        except RuntimeError:
            self._pipe = None
            raise
        return _to_torch(out, self.device)

    def _labels(self, indices) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[torch.as_tensor(indices, dtype=torch.long)]


def _to_torch(out, device: torch.device) -> torch.Tensor:
    tensor = out.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.array(tensor))
    from nvidia.dali.plugin.pytorch import feed_ndarray
    result = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
    feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
    return result


def _flags(flip, n: int) -> list[np.ndarray]:
    bits = np.zeros(n, bool) if flip is None else np.asarray(torch.as_tensor(flip).cpu(), bool)
    return [np.array(int(b), np.int32) for b in bits]


class DaliImageDataset(_DaliSource):
    """A folder or zip of PNG/JPEG files, decoded per batch by DALI."""

    def __init__(self, source, path: Path, resolution, channels, labels_path, on_corrupt, device_id, num_threads):
        self._archive = open_zip(path) if source == "zip" else None
        self._entries = list_zip(path, self._archive) if source == "zip" else list_folder(path)
        super().__init__(len(self._entries), resolution, channels, labels_path, device_id, num_threads)
        self.on_corrupt = on_corrupt
        self._bad: set[int] = set()

    def _graph(self, fn, types):
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        flip = fn.external_source(name="flip", dtype=types.INT32)
        decoder = "cpu" if self.device_id is None else "mixed"
        image = fn.decoders.image(encoded, device=decoder, output_type=types.GRAY if self.channels == 1 else types.RGB)
        image = fn.transpose(fn.flip(image, horizontal=flip), perm=[2, 0, 1])     # HWC → CHW
        return fn.cast(image, dtype=types.FLOAT) / 127.5 - 1.0                    # the torch loader's scaling

    def _bytes(self, index: int) -> np.ndarray:
        """The file's encoded bytes after a header check (mode and size, as the torch loader checks)."""
        name, open_bytes = self._entries[index]
        try:
            with open_bytes() as stream:
                data = stream.read()
        except OSError as error:
            raise CorruptFileError(f"{name} cannot be read ({error}): replace or remove it") from None
        decode_image(name, lambda: _BytesIO(data), self.resolution, self.channels, decode=False)
        self.samples_read += 1
        return np.frombuffer(data, np.uint8)

    def _mark_bad(self, index: int, error: CorruptFileError) -> None:
        if self.on_corrupt != "skip":
            raise error
        self._bad.add(index)
        self.skipped.append(self._entries[index][0])
        report_skipped([self._entries[index][0]], len(self.skipped))

    def gather(self, indices, flip=None):
        """(images [B,C,H,W], labels [B] or None) for `indices`, mirrored where `flip` is True."""
        indices = [int(i) for i in torch.as_tensor(indices).reshape(-1)]
        flags = _flags(flip, len(indices))
        while True:
            chosen = [next_good(i, self._bad, self.count) for i in indices]
            encoded, retry = [], False
            for index in chosen:
                try:
                    encoded.append(self._bytes(index))
                except CorruptFileError as error:
                    self._mark_bad(index, error)
                    retry = True
                    break
            if retry:
                continue
            try:
                return self._run({"encoded": encoded, "flip": flags}), self._labels(chosen)
            except RuntimeError as dali_error:
                culprits = self._find_unreadable(chosen)
                if not culprits:
                    names = ", ".join(self._entries[i][0] for i in dict.fromkeys(chosen))
                    raise DataError(f"DALI could not decode this batch ({str(dali_error).splitlines()[-2:]}) "
                                    f"of {names}: check these files or set data.loader=torch") from None
                for index, error in culprits:
                    self._mark_bad(index, error)

    def _find_unreadable(self, chosen) -> list:
        """Which files of a batch DALI failed on are unreadable, judged by the torch loader's full decode."""
        found = []
        for index in dict.fromkeys(chosen):
            name, open_bytes = self._entries[index]
            try:
                decode_image(name, open_bytes, self.resolution, self.channels)
            except CorruptFileError as error:
                found.append((index, error))
        return found


class _BytesIO:
    """A context-managed in-memory stream (io.BytesIO without copying the bytes twice)."""

    def __init__(self, data: bytes):
        import io
        self._stream = io.BytesIO(data)

    def __enter__(self):
        return self._stream

    def __exit__(self, *exc):
        self._stream.close()


class DaliNpyDataset(_DaliSource):
    """A `.npy` array [N,C,H,W] (or [N,H,W,C]): the rank's rows from a memory map, flipped by DALI."""

    def __init__(self, path: Path, resolution, channels, layout, labels_path, device_id, num_threads):
        self._array = checked_npy(path, resolution, channels, layout, mmap_mode="r")
        self.layout = layout
        super().__init__(len(self._array), resolution, channels, labels_path, device_id, num_threads)

    def _graph(self, fn, types):
        rows = fn.external_source(name="rows", dtype=types.FLOAT, device="cpu")
        flip = fn.external_source(name="flip", dtype=types.INT32)
        if self.device_id is not None:
            rows = rows.gpu()
        hwc = self.layout == "NHWC"
        rows = fn.flip(fn.reshape(rows, layout="HWC" if hwc else "CHW"), horizontal=flip)
        return fn.transpose(rows, perm=[2, 0, 1]) if hwc else rows

    def gather(self, indices, flip=None):
        indices = [int(i) for i in torch.as_tensor(indices).reshape(-1)]
        rows = [np.ascontiguousarray(self._array[i], dtype=np.float32) for i in indices]
        self.samples_read += len(rows)
        return self._run({"rows": rows, "flip": _flags(flip, len(indices))}), self._labels(indices)
