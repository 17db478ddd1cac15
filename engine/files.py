"""Writing files so that a reader (or a restart after a kill) never sees half of one, reading weight files
without running code from them, and the cache folder."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems: ``path`` is either the old file or the whole new one.
    The file gets mode 0644 (mkstemp's 0600 would hide a shared cache from other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def cache_dir() -> Path:
    """Where trained helper networks are cached: $CMT_CACHE, else ~/.cache/cmt_engine."""
    return Path(os.environ.get("CMT_CACHE") or Path.home() / ".cache" / "cmt_engine")


def cached_file(prefix: str, recipe: dict, directory: str | Path | None = None) -> Path:
    """The cache file of a helper network trained from ``recipe``: its hash names the file, so any change
    to the recipe trains anew rather than loading a stale network."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory or cache_dir()) / f"{prefix}_{digest}.safetensors"


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | Path | None) -> str | None:
    """sha256 of a file, or of a directory's files (names and contents, sorted): what a run read, recorded
    so that a resume can tell when it changed. None for no path."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\0".encode())
    return digest.hexdigest()


def read_tensor_file(path: str | Path):
    """A weights file as saved: safetensors by suffix, else ``torch.load(weights_only=True)`` on the CPU, which
    rebuilds tensors and plain containers only (anything else raises pickle.UnpicklingError, unrun)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
