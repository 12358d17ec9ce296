"""Read PyTorch ``.pth``/``.bin`` state dicts into NumPy without torch and without running file code.

PyTorch checkpoints are pickles. A plain ``pickle.load`` would import and call whatever the file
names, so this reader uses an unpickler that resolves only the handful of globals a state dict
needs (tensor rebuild functions, storage types, ``OrderedDict``) and refuses everything else.
Both on-disk layouts are supported: the zip archive written since PyTorch 1.6 and the older
"legacy" stream of consecutive pickles followed by raw storages.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# elements a file's tensors may copy out to beyond twice what its storages hold (views of one storage,
# zero-stride expansions): room for tied weights and small expanded buffers, far below the memory a
# crafted file of a few bytes could otherwise claim
_LARGEST_EXPANSION = 2**24


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for a Python global that a plain state dict never needs."""


class _RefusesPickleState:
    # pickle's BUILD opcode would otherwise write whatever a file says into an object's __dict__: an
    # attribute named like a method (say _check_layout, set to an allowed identity function) would
    # shadow it and switch the bounds check off. torch.save never sends state for these objects.
    def __setstate__(self, state) -> None:
        raise UnsafePickleError(
            f"file sets attributes on a {type(self).__name__.strip('_')}: not a plain state dict"
        )


@dataclass
class _Storage(_RefusesPickleState):
    dtype: type
    key: str
    numel: int | None = None
    data: np.ndarray | None = None


@dataclass
class _LazyTensor(_RefusesPickleState):
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self, key: str, budget: _CopyBudget) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError(f"tensor {key!r}: storage {self.storage.key} has no data")
        self._check_layout(key, len(flat))
        budget.spend(key, math.prod(self.size))
        if not self.size:
            return np.array(flat[self.offset])
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        )
        # C order whatever the file's strides (channels-last, transposed): order "K" would keep them,
        # and safetensors.numpy.save_file, for one, writes an array's memory as if it were C order
        return np.array(view, order="C")  # a copy: a view would share the file's read-only buffer

    def _check_layout(self, key: str, storage_numel: int) -> None:
        # as_strided reads wherever offset, size and stride point, so a crafted file could make it
        # copy heap memory past the storage (or crash); only layouts inside the storage are viewed.
        layout = f"tensor {key!r} (offset {self.offset!r}, size {self.size!r}, stride {self.stride!r})"
        numbers = (self.offset, *self.size, *self.stride)
        if not all(isinstance(n, int) for n in numbers):
            raise pickle.UnpicklingError(f"{layout}: offset, size and stride must be integers")
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError(f"{layout}: size and stride have different lengths")
        # torch.save writes zero strides (expanded tensors) but never negative ones
        if any(n < 0 for n in numbers):
            raise pickle.UnpicklingError(f"{layout}: negative offset, size or stride")
        if 0 in self.size:
            return  # an empty tensor reads nothing
        last_index = self.offset + sum((n - 1) * step for n, step in zip(self.size, self.stride, strict=True))
        if last_index >= storage_numel:
            raise pickle.UnpicklingError(
                f"{layout} reaches element {last_index} but its storage holds {storage_numel}"
            )


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    return data


class _Unused:
    """Stands in for an object a training checkpoint keeps beside its weights (timm's train.py saves
    its ``argparse.Namespace`` of arguments): built empty, its state dropped, never called."""

    def __setstate__(self, state) -> None:
        pass


class _StorageType(_RefusesPickleState):
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("argparse", "Namespace"):
            return _Unused
        raise UnsafePickleError(f"refusing to load global {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unsupported storage type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            # a tensor on part of a storage (pre-1.6 files): its offsets count from the view's start
            raise pickle.UnpicklingError(
                f"storage {key} is a view into another storage, which this reader does not support; "
                "load the file in PyTorch and save it again (torch.save writes no views since 1.6)"
            )
        if key not in self._storages:
            numel = int(pid[4]) if len(pid) > 4 else None
            self._storages[key] = _Storage(storage_type.dtype, key, numel)
        return self._storages[key]


def _lazy_tensors(obj) -> Iterator[_LazyTensor]:
    if isinstance(obj, _LazyTensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _lazy_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _lazy_tensors(value)


class _CopyBudget:
    """The copies ``materialize`` makes are dense, where torch.load keeps views: a file's tensors may
    not copy out far more elements than its storages hold (views of one storage, zero strides)."""

    def __init__(self, obj):
        storages = {id(t.storage): t.storage for t in _lazy_tensors(obj)}.values()
        self.held = sum(len(s.data) for s in storages if s.data is not None)
        self.limit = self.left = 2 * self.held + _LARGEST_EXPANSION

    def spend(self, key: str, numel: int) -> None:
        self.left -= numel
        if self.left < 0:
            raise pickle.UnpicklingError(
                f"tensor {key!r}: with it the tensors copy out more than {self.limit} "
                f"elements, but the file holds {self.held} (views of one storage or zero-stride "
                "expansions); save them with .contiguous() if they are meant to be that large"
            )


def _materialize(obj, budget: _CopyBudget, key: str = ""):
    if isinstance(obj, _LazyTensor):
        return obj.materialize(key, budget)
    child_prefix = f"{key}." if key else ""
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v, budget, f"{child_prefix}{k}")) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v, budget, f"{child_prefix}{i}") for i, v in enumerate(obj))
    return obj


def _weights_of(obj: object) -> object:
    """The state dict itself: a training checkpoint keeps it under one of these keys."""
    for wrapper in ("state_dict", "model", "model_ema"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            return obj[wrapper]
    return obj


def _storage_keys(obj: object) -> set[str]:
    """The storages ``obj``'s tensors are views of: only these are read (a training checkpoint's
    optimizer state, twice the weights for Adam, stays on disk)."""
    if isinstance(obj, _LazyTensor):
        return {obj.storage.key}
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    return set().union(*(_storage_keys(v) for v in values))


def _load_zip(path: Path) -> object:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl_name = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl_name is None:
            raise pickle.UnpicklingError("zip archive has no data.pkl: not a PyTorch checkpoint")
        prefix = pkl_name[: -len("data.pkl")]
        obj = _weights_of(_RestrictedUnpickler(io.BytesIO(archive.read(pkl_name)), storages).load())
        for key in _storage_keys(obj):
            storage = storages[key]
            name = f"{prefix}data/{storage.key}"
            _check_storage_size(storage, archive.getinfo(name))
            storage.data = np.frombuffer(archive.read(name), dtype=storage.dtype)
    return obj


# torch.save stores storages uncompressed; a compressed entry may not expand more than this
_LARGEST_COMPRESSION = 64


def _check_storage_size(storage: _Storage, info: zipfile.ZipInfo) -> None:
    """Refuse a storage entry that unpacks to another size than its record declares, or far beyond
    its packed size: a few KB of deflated zeros would otherwise take any amount of memory."""
    declared = None if storage.numel is None else storage.numel * np.dtype(storage.dtype).itemsize
    if declared is not None and info.file_size != declared:
        raise pickle.UnpicklingError(
            f"storage {storage.key} unpacks to {info.file_size} bytes, but its record declares {declared}"
        )
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _LARGEST_COMPRESSION * max(
        info.compress_size, 1
    ):
        raise pickle.UnpicklingError(
            f"storage {storage.key} unpacks from {info.compress_size} to {info.file_size} bytes; "
            "torch.save stores storages uncompressed"
        )


def _load_legacy(path: Path) -> object:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        magic = _RestrictedUnpickler(f, storages).load()
        if magic != _LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a PyTorch checkpoint (bad magic number)")
        _RestrictedUnpickler(f, storages).load()  # protocol version
        _RestrictedUnpickler(f, storages).load()  # sys info (endianness, type sizes)
        obj = _weights_of(_RestrictedUnpickler(f, storages).load())
        needed = _storage_keys(obj)
        keys = _RestrictedUnpickler(f, storages).load()
        size = os.fstat(f.fileno()).st_size
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * np.dtype(storage.dtype).itemsize
            if numel < 0 or nbytes > size - f.tell() or storage.numel not in (None, numel):
                raise pickle.UnpicklingError(
                    f"storage {storage.key} declares {numel} elements, which the file "
                    f"({size - f.tell()} bytes left) or its record ({storage.numel}) does not hold"
                )
            if storage.key not in needed:
                f.seek(nbytes, io.SEEK_CUR)
                continue
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise pickle.UnpicklingError("file is truncated")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return obj


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict as ``{name: np.ndarray}``; tensors nested under
    ``state_dict``/``model`` keys (training checkpoints) are unwrapped."""
    path = Path(path)
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    obj = _materialize(obj, _CopyBudget(obj))
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a state dict, found {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            state[str(key).removeprefix("module.")] = value
    return state
