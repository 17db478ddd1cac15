"""Reference statistics (mean and covariance of a data set's detector features) in the formats EDM, EDM2 and ADM
publish them, read without running code from the file.

- ``.npz`` with ``mu`` and ``sigma``: EDM's format (``fid-refs/*.npz``), one metric. ADM's evaluator reference
  batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` the images, ``mu``/``sigma`` Inception pool features,
  ``mu_s``/``sigma_s`` its spatial features) read the same way, as FID statistics; their images are a 10k sample
  while the statistics cover the whole data set, so no image count is taken from them. Read with
  ``allow_pickle=False``: an object array is refused.
- ``.pkl``: EDM2's dataset refs, a plain pickle of ``{metric: {"mu": ndarray, "sigma": ndarray}}``, unpickled by
  the restricted unpickler of engine/models/released.py (numpy arrays and containers are rebuilt, any other call
  is refused unrun).

What is written is exactly those formats, plus ``num_images`` beside ``mu`` and ``sigma`` when known (EDM's and
EDM2's readers index ``mu`` and ``sigma`` and ignore it): Fréchet distances shrink with the number of images, so
the count belongs with the statistics.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, DataError, MissingFileError
from engine.eval.detectors import FEATURE_DIMS, METRICS
from engine.files import sha256, write_atomically
from engine.models.released import Inert, PlantedCall, RestrictedUnpickler, _numpy_dtype


@dataclass
class ReferenceStats:
    metric: str
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None
    source: str


def read_reference(path, metric: str) -> ReferenceStats:
    """The `metric` statistics of a reference file; a one-line error for a missing file, an unknown format, a
    metric the file lacks or statistics of another feature dimension."""
    path = Path(path)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")
    if not path.is_file():
        raise MissingFileError(f"reference statistics '{path}' not found: pass an EDM .npz, an EDM2 refs .pkl or "
                               "one made with `cmt-evaluate ref`")
    if path.suffix == ".npz":
        entry, source = _read_npz(path)
    elif path.suffix == ".pkl":
        entry, source = _read_pkl(path, metric)
    else:
        raise DataError(f"'{path}' is not a reference format this engine reads: pass an .npz (EDM, ADM) or a .pkl "
                        "(EDM2 refs)")
    return _checked(path, metric, entry, source)


def write_reference(path, stats: dict[str, ReferenceStats]) -> Path:
    """``.npz``: EDM's format, one metric; ``.pkl``: EDM2's refs format, any of them. Written atomically."""
    path = Path(path)
    if path.suffix not in (".npz", ".pkl"):
        raise ConfigError(f"reference output '{path}' must end in .npz (EDM's format, one metric) or .pkl (EDM2's)")
    if not stats:
        raise ConfigError(f"no statistics to write to '{path}'")
    entries = {}
    for metric, s in stats.items():
        mu, sigma = np.asarray(s.mu, np.float64), np.asarray(s.sigma, np.float64)
        if s.metric != metric or metric not in METRICS or mu.shape != (FEATURE_DIMS[metric],) \
                or sigma.shape != mu.shape * 2:
            raise ValueError(f"statistics filed under '{metric}' are {s.metric} statistics of shape mu "
                             f"{list(mu.shape)}, sigma {list(sigma.shape)}")
        entries[metric] = {"mu": mu, "sigma": sigma, **({} if s.num_images is None else
                                                         {"num_images": int(s.num_images)})}
    if path.suffix == ".npz":
        if len(entries) != 1:
            raise ConfigError(f"an .npz holds one metric (EDM's format), got {', '.join(entries)}: write a .pkl "
                              "(EDM2's format) for several")
        (entry,) = entries.values()
        return write_atomically(path, lambda tmp: _save_npz(tmp, entry))
    # protocol 4: any Python 3 reads it, and the bytes (so reference_hash) do not depend on the Python version
    return write_atomically(path, lambda tmp: tmp.write_bytes(pickle.dumps(entries, protocol=4)))


def reference_hash(path) -> str:
    """sha256 of the reference file, recorded in metrics.json so that a score names the statistics it used."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"reference statistics '{path}' not found")
    return sha256(path)


def _save_npz(tmp: Path, entry: dict) -> None:
    with open(tmp, "wb") as f:       # a file object: np.savez would append .npz to the temporary name
        np.savez(f, **entry)


def _read_npz(path: Path) -> tuple[dict, str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())
            entry = {name: data[name] for name in ("mu", "sigma", "num_images") if name in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"'{path}' is not a readable .npz ({first[:200]}): get it again or make it with "
                        "`cmt-evaluate ref`") from None
    if "mu" not in entry or "sigma" not in entry:
        raise DataError(f"'{path}' holds no mu and sigma (its arrays: {', '.join(names) or 'none'}): it is not "
                        "reference statistics; make them with `cmt-evaluate ref`")
    return entry, f"{path.name} ({'ADM reference batch' if 'mu_s' in names else 'EDM .npz'})"


class _RefsUnpickler(RestrictedUnpickler):
    """The restricted unpickler, also allowed the two calls numpy arrays pickle to beyond it: bytes as latin-1
    text (protocols 0-2) and numpy's _frombuffer (protocol 5, pickle's default from Python 3.14)."""
    dispatch = dict(RestrictedUnpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if module in ("numpy._core.numeric", "numpy.core.numeric") and name == "_frombuffer":
            return _array_from_buffer
        return super().find_class(module, name)

    def load_reduce(self):
        if any(self.stack[-2] is call for call in (_latin1_bytes, _array_from_buffer)):
            args = self.stack.pop()
            self.stack[-1] = self.stack[-1](*args)
        else:
            super().load_reduce()
    dispatch[pickle.REDUCE[0]] = load_reduce


def _latin1_bytes(text, encoding="latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode with arguments a pickled array never has")
    return text.encode("latin1")


def _array_from_buffer(buffer, dtype, shape, order) -> np.ndarray:
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(shape, tuple) or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy's _frombuffer with arguments a pickled array never has")
    return np.frombuffer(buffer, dtype=_numpy_dtype(dtype)).reshape(shape, order=order).copy()


def _read_pkl(path: Path, metric: str) -> tuple[dict, str]:
    try:
        with open(path, "rb") as f:
            data = _RefsUnpickler(f).load()
    except PlantedCall as call:
        raise DataError(f"'{path}' calls {call} while it is read, which no statistics file needs: refused, nothing "
                        "from it was run (a tampered file? get it again from its source)") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"'{path}' is not a readable refs pickle ({first[:200]}): pass EDM2's dataset refs .pkl or "
                        "one made with `cmt-evaluate ref`") from None
    if isinstance(data, Inert):                               # a dict subclass (EasyDict) rebuilt as a record
        data = data.__dict__.get("mapping")
    if not isinstance(data, dict):
        raise DataError(f"'{path}' holds no {{metric: {{mu, sigma}}}} dict (EDM2's refs format)")
    if metric not in data:
        raise DataError(f"'{path}' has no {metric} statistics (it holds: {', '.join(map(str, data)) or 'nothing'}): "
                        f"make them with `cmt-evaluate ref --metrics {metric}`")
    entry = data[metric]
    if isinstance(entry, Inert):
        entry = entry.__dict__.get("mapping")
    if not isinstance(entry, dict):
        raise DataError(f"'{path}': its {metric} entry is not a dict of mu and sigma (EDM2's refs format)")
    return {k: getattr(v, "array", v) if isinstance(v, Inert) else v for k, v in entry.items()}, \
        f"{path.name} (EDM2 refs .pkl)"


def _checked(path: Path, metric: str, entry: dict, source: str) -> ReferenceStats:
    """ReferenceStats from {mu, sigma[, num_images]}, or a one-line DataError saying what is wrong with them."""
    mu, sigma = entry.get("mu"), entry.get("sigma")
    if not isinstance(mu, np.ndarray) or not isinstance(sigma, np.ndarray):
        raise DataError(f"'{path}': the {metric} entry needs numpy arrays mu and sigma")
    dim = FEATURE_DIMS[metric]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise DataError(f"'{path}' holds statistics of shape mu {list(mu.shape)}, sigma {list(sigma.shape)}, but "
                        f"{metric} features are {dim}-d: these were made with another network; use a reference made "
                        f"for {metric}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"'{path}': the {metric} statistics contain NaN or infinite values: make them again")
    count = entry.get("num_images")
    if count is not None and not (np.ndim(count) == 0 and np.issubdtype(np.asarray(count).dtype, np.integer)):
        raise DataError(f"'{path}': its {metric} num_images is not a whole number: make the statistics again")
    return ReferenceStats(metric, mu.astype(np.float64), sigma.astype(np.float64),
                          None if count is None else int(count), source)
