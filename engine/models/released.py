"""Reading released checkpoints without running any code from them.

- **Snapshot pickles** (EDM and EDM2 ``network-snapshot-*.pkl``): a pickle of "persistent" modules that embeds
  each class's source and rebuilds the network by executing it. :func:`read_pickle` unpickles with a
  restricted unpickler instead: tensors, storages and plain containers are rebuilt; every other reference
  (the persistence wrappers, ``dnnlib``, numpy, torch modules) becomes an inert record of what it names and
  the state it was given — nothing is imported, and the embedded source is dropped unread. A pickle that
  *calls* anything outside the allow-list (a ``__reduce__`` naming ``os.system`` ...) is refused
  (:class:`PlantedCall`): released checkpoints only rebuild objects. :func:`snapshot_network` then recovers a
  module's parameters, persistent buffers and constructor arguments from the records.
- **Training checkpoints** (``.pt`` dicts such as DiT/SiT's ``{"model", "ema", "opt", "args"}``): read with
  ``torch.load(weights_only=True)`` when they hold only tensors and containers, else through the restricted
  unpickler (an ``argparse.Namespace`` becomes an inert record); ``ema`` is taken, else ``model``, else the
  file itself as the state dict. ``torch.save(module)`` files give the module's tensors.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engine.errors import DataError


class PlantedCall(pickle.UnpicklingError):
    """The pickle calls or rebuilds something outside the allow-list (``os.system`` ...): refused, nothing run."""


class Inert:
    """A reference the restricted unpickler will not resolve: what it names, and the state it was given."""
    module = "?"
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state):
        self.state = state

    # APPEND(S) / SETITEM(S) on an inert object (a list or dict subclass such as dnnlib's EasyDict)
    def append(self, value):
        self.__dict__.setdefault("items", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("items", []).extend(values)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("mapping", {})[key] = value

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.qualname}>"


def _inert(module: str, name: str) -> type:
    return type(name, (Inert,), {"module": module, "qualname": name})


@dataclass
class Persistent:
    """A persistence-wrapped object of a snapshot pickle: its class name and its pickled ``__dict__``."""
    class_name: str
    state: dict = field(repr=False)


def _persistent(meta: dict) -> Persistent:
    """Stands in for the persistence module's reconstruct function: keeps the class name and the state,
    drops the embedded source (``module_src``) without reading it."""
    state = meta.get("state") if isinstance(meta, dict) else None
    return Persistent(str(meta.get("class_name")) if isinstance(meta, dict) else "?",
                      state if isinstance(state, dict) else {})


def _storage_from_bytes(data: bytes):
    """What torch storages reduce to when pickled: their bytes in torch's own format, read weights-only."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a storage without bytes")
    return torch.load(io.BytesIO(data), weights_only=True)


def _no_hooks(backward_hooks) -> None:
    if backward_hooks:
        raise PlantedCall("a tensor with backward hooks")


def _tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *metadata):
    """torch's tensor rebuild without its hooks and autograd flags (a weight needs neither)."""
    _no_hooks(backward_hooks)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _parameter(data, requires_grad=False, backward_hooks=None, *rest):
    _no_hooks(backward_hooks)
    return data


class _DtypeRecord(Inert):
    """numpy's dtype, kept as its name (and, from BUILD, its byte order) until an array asks for it."""
    module, qualname = "numpy", "dtype"


_PLAIN_KINDS = "biufc"   # bool, int, uint, float, complex: no object, void or structured dtypes


def _numpy_dtype(record) -> np.dtype:
    """The plain numpy dtype a record names; anything else (objects, fields, sub-arrays) is refused."""
    name = record.args[0] if isinstance(record, _DtypeRecord) and record.args else None
    if not isinstance(name, str):
        raise pickle.UnpicklingError("a numpy array without a plain dtype")
    dtype = np.dtype(name)
    if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise PlantedCall(f"a numpy array of dtype {name!r}")
    order = record.state[1] if isinstance(record.state, tuple) and len(record.state) > 1 else "="
    return dtype.newbyteorder(order) if order in ("<", ">") else dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a numpy scalar without bytes")
    return np.frombuffer(data, dtype=_numpy_dtype(dtype))[0].item()


class _NumpyArray(Inert):
    """numpy's ndarray reconstruction: the data comes in the BUILD state (version, shape, dtype, fortran, bytes)."""
    module, qualname = "numpy", "ndarray"

    def __setstate__(self, state):
        try:
            _, shape, dtype, fortran, data = state
            self.array = np.frombuffer(data, dtype=_numpy_dtype(dtype)).reshape(
                shape, order="F" if fortran else "C").copy()
        except (TypeError, ValueError):
            self.array = None


def _numpy_reconstruct(*args):
    return _NumpyArray()


_SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,          # a module's _non_persistent_buffers_set
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("numpy", "dtype"): _DtypeRecord,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
}
# What a pickle may call (REDUCE, or INST/OBJ with arguments); everything else it names is only a record.
_CALLABLE = {id(f) for f in _SAFE.values()} - {id(_NumpyArray)}


def _name_of(obj) -> str:
    return f"{obj.module}.{obj.qualname}" if isinstance(obj, type) and issubclass(obj, Inert) else repr(obj)


class RestrictedUnpickler(pickle._Unpickler):
    """Rebuilds tensors and plain containers; everything else becomes an :class:`Inert` record.

    The pure-Python unpickler, with three opcodes narrowed: a call (REDUCE, INST/OBJ with arguments) must be
    of an allow-listed function, and BUILD (setting an object's state) may only target inert records — so
    no real object, allow-listed or not, can have its attributes set from the file."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        return _inert(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids (torch.save's zip format) are read with torch.load")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE:
            raise PlantedCall(_name_of(func))
        self.stack[-1] = func(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass, args):
        if args and id(klass) not in _CALLABLE:
            raise PlantedCall(_name_of(klass))
        super()._instantiate(klass, args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, Inert):
            raise PlantedCall(f"setting the state of {type(inst).__name__}")
        inst.__setstate__(state)
    dispatch[pickle.BUILD[0]] = load_build


def read_pickle(path) -> Any:
    with open(path, "rb") as f:
        return RestrictedUnpickler(f).load()


# --------------------------------------------------------------------------------------------------
# From unpickled records to a network
# --------------------------------------------------------------------------------------------------
def _state_of(obj) -> Optional[dict]:
    """The pickled ``__dict__`` of an nn.Module record (persistent or a plain torch module), or None."""
    if isinstance(obj, Persistent):
        return obj.state
    if isinstance(obj, Inert) and isinstance(obj.state, dict):
        return obj.state
    return None


def module_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module record and its children, by dotted name, in module
    order (what ``state_dict()`` of the rebuilt module would give)."""
    state = _state_of(obj)
    if state is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_parameters") or {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def plain(value):
    """Constructor arguments as plain Python: numpy scalars/arrays to numbers/lists, inert records to None."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, _NumpyArray):
        return None if value.array is None else value.array.tolist()
    if isinstance(value, (Inert, Persistent)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class SnapshotNetwork:
    """A network recovered from a snapshot: its class, constructor arguments and state dict."""
    class_name: str
    init_kwargs: dict
    state_dict: dict[str, torch.Tensor]


def snapshot_network(obj: Persistent) -> SnapshotNetwork:
    state = obj.state
    kwargs = plain(state.get("_init_kwargs") or {})
    if state.get("_init_args"):
        raise DataError(f"the snapshot's {obj.class_name} was built with positional arguments "
                        f"{plain(state['_init_args'])}: pass --config with the network's settings")
    return SnapshotNetwork(obj.class_name, kwargs, module_state_dict(obj))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
@dataclass
class Released:
    """What a released file holds: a state dict, and the network's class and arguments when the file says."""
    state_dict: dict[str, torch.Tensor]
    format: str                                   # "snapshot", "checkpoint", "state_dict" or "module"
    class_name: Optional[str] = None              # e.g. "EDMPrecond", "Precond" (snapshots only)
    init_kwargs: dict = field(default_factory=dict)
    taken_from: Optional[str] = None              # which entry of a checkpoint dict ("ema", "model")


CHECKPOINT_KEYS = ("ema", "model", "state_dict", "net")


def read_released(path) -> Released:
    """A released file of any supported kind; a one-line DataError for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":                       # torch.save's zip format: .pt / .pth
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:                 # non-tensor entries (argparse.Namespace ...)
                data = _restricted_torch_load(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return Released(load_file(str(path)), "state_dict")
        else:
            data = read_pickle(path)
    except PlantedCall as call:
        raise DataError(f"'{path}' asks for {call} while it is read, which no checkpoint needs: refused, nothing "
                        "from it was run (a tampered file? get it again from its source)") from None
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, AttributeError, IndexError,
            KeyError, TypeError, struct.error) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"'{path}' is not a readable checkpoint ({first}): pass a released .pkl snapshot, a "
                        ".pt/.pth checkpoint or state dict, or a .safetensors file") from None
    if isinstance(data, Inert) and isinstance(data.__dict__.get("mapping"), dict):   # a dict subclass (EasyDict)
        data = data.mapping
    if isinstance(data, dict) and isinstance(data.get("ema"), Persistent):
        net = snapshot_network(data["ema"])
        return Released(net.state_dict, "snapshot", net.class_name, net.init_kwargs, "ema")
    if isinstance(data, Persistent):
        net = snapshot_network(data)
        return Released(net.state_dict, "snapshot", net.class_name, net.init_kwargs)
    if _state_of(data) is not None and "_parameters" in _state_of(data):   # torch.save(module): its tensors only
        return Released(module_state_dict(data), "module", class_name=type(data).qualname)
    if isinstance(data, dict):
        if all(isinstance(v, torch.Tensor) for v in data.values()) and data:
            return Released(dict(data), "state_dict")
        for key in CHECKPOINT_KEYS:
            inner = data.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return Released(dict(inner), "checkpoint", taken_from=key)
    raise DataError(f"'{path}' holds no network weights this reader knows (a snapshot pickle with 'ema', a "
                    f"state dict, or a checkpoint dict with one of {', '.join(CHECKPOINT_KEYS)})")


# The element type of each storage class torch.save names (what a persistent id says; never the class itself).
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class _StorageType(Inert):
    """A storage class named by the file, as its element type only."""
    module = "torch"


def _restricted_torch_load(path: Path):
    """torch.save's zip format through the restricted unpickler: the tensors' storages are read from the
    archive, every other object becomes an inert record."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        data_pkl = archive.read(f"{root}/data.pkl")

        class _Zip(RestrictedUnpickler):
            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                        and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
                    raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
                raw = archive.read(f"{root}/data/{pid[2]}")
                with warnings.catch_warnings():   # TypedStorage is deprecated for users, still torch's own format
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage.from_buffer(
                        raw, dtype=torch.uint8), dtype=pid[1].dtype, _internal=True)

            def find_class(self, module, name):
                if module == "torch" and name in _STORAGE_DTYPES:
                    record = _StorageType()
                    record.qualname, record.dtype = name, _STORAGE_DTYPES[name]
                    return record
                return super().find_class(module, name)

        return _Zip(io.BytesIO(data_pkl)).load()
