"""Read ``torch.save`` files without executing pickled code, and without reading the weights.

Checkpoints come from the internet and are pickles. We unpickle with our own allow-list:
tensors, containers, ``argparse.Namespace``; ``metaseq`` / ``fairseq`` / ``omegaconf`` /
``numpy`` objects become inert ``Placeholder`` instances that only record their arguments; any
other global (``os.system``, ``builtins.eval``, ...) is refused before anything is called.

Tensors come back as ``LazyTensor`` records (file, byte offset, dtype, shape): nothing is read
until ``read()`` (a fresh buffer, for streaming) or ``mmap()`` (zero-copy, for serving).
Both formats are handled: the zip format of torch >= 1.6 and the legacy sequential format.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import dataclasses
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items()}
# Objects of these packages are data containers in real checkpoints (training state,
# tokenization caches, configs): kept as inert records, never instantiated.
_INERT_PACKAGES = ("metaseq", "fairseq", "omegaconf", "numpy", "typing")
_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "range"}


class Placeholder:
    """Stands for an object of a class we will not import. Holds args and state only."""

    _module = "?"
    _name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self._module}.{self._name}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int
    file_offset: int  # absolute byte offset of the storage's first byte in the file


@dataclass(frozen=True)
class LazyTensor:
    """A tensor stored in ``path``; ``read()`` / ``mmap()`` materialise it."""

    path: str
    file_offset: int  # byte offset of element 0 of this tensor's storage
    storage_numel: int
    dtype: torch.dtype
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def _contiguous(self) -> bool:
        expect, acc = [], 1
        for s in reversed(self.shape):
            expect.append(acc)
            acc *= s
        return all(sz == 1 or st == e for sz, st, e in zip(self.shape, self.stride, reversed(expect)))

    def _span(self) -> tuple[int, int]:
        """(first element, element count) of the storage range this tensor touches."""
        if self.numel == 0:
            return self.storage_offset, 0
        last = self.storage_offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return self.storage_offset, last - self.storage_offset + 1

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Copy the tensor (or rows [a, b) of dim 0) into fresh memory with one pread."""
        first, count = self._span()
        shape = self.shape
        if rows is not None:
            if not self._contiguous():
                return self.read()[rows[0]:rows[1]].clone()
            a, b = rows
            per_row = math.prod(self.shape[1:])
            first, count, shape = first + a * per_row, (b - a) * per_row, (b - a, *self.shape[1:])
        # torch.empty, not bytearray: the buffer is not zero-filled first (a full extra pass
        # over memory), and large ones come from torch's allocator.
        raw = torch.empty(count * self.itemsize, dtype=torch.uint8)
        view, done = memoryview(raw.numpy()), 0
        with open(self.path, "rb") as f:
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                got = os.preadv(f.fileno(), [view[done:]],
                                self.file_offset + first * self.itemsize + done)
                if got <= 0:
                    raise CheckpointError(self.path, "is truncated: a tensor's bytes end past "
                                          "the end of the file", "download or copy the file "
                                          "again")
                done += got
        flat = raw.view(self.dtype)
        if rows is not None or self._contiguous():
            return flat.view(shape)
        return flat.as_strided(self.shape, self.stride, 0)

    def mmap(self) -> torch.Tensor:
        """A zero-copy, copy-on-write view of the file (pages load on first touch)."""
        first, count = self._span()
        if count == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        start = self.file_offset + first * self.itemsize
        page = start - start % mmap.ALLOCATIONGRANULARITY
        length = start - page + count * self.itemsize
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY, offset=page)
        flat = torch.frombuffer(mm, dtype=torch.uint8, offset=start - page,
                                count=count * self.itemsize).view(self.dtype)
        return flat.as_strided(self.shape, self.stride, 0)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storage_offset):
        super().__init__(file)
        self.path = path
        self.storage_offset = storage_offset  # key -> absolute file offset
        self.placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor":
            return lambda storage, offset, size, stride: self._rebuild_tensor(
                storage, offset, size, stride)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if (module, name) == ("torch", "Size"):
            return lambda dims=(): tuple(dims)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module.split(".")[0] in _INERT_PACKAGES:
            key = (module, name)
            if key not in self.placeholders:
                self.placeholders[key] = type(name, (Placeholder,),
                                              {"_module": module, "_name": name})
            return self.placeholders[key]
        raise CheckpointError(
            self.path, f"contains a pickled reference to {module}.{name}, which is not a tensor "
            "or a plain container: loading it could run code, so it was refused (nothing was "
            "executed)", "use checkpoints from a trusted source; if this one is genuine, "
            "re-save it with plain tensors and dicts")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(self.path, f"has an unknown persistent id {pid!r}",
                                  "this is not a torch checkpoint this tool can read")
        _, stype, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise CheckpointError(self.path, "uses legacy storage views",
                                  "re-save it with torch >= 1.6 (zip format)")
        if not isinstance(stype, _StorageType):
            stype = _StorageType(torch.uint8)
        key = str(key)
        if key not in self.storage_offset:
            raise CheckpointError(self.path, f"references tensor data {key!r} that is missing",
                                  "the file is truncated or corrupt: download it again")
        return _StorageRef(key, stype.dtype, int(numel), self.storage_offset[key])

    def _rebuild_tensor(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _StorageRef):
            raise CheckpointError(self.path, "has a tensor without storage", "file is corrupt")
        dtype = storage.dtype
        # Untyped (uint8) storages carry the dtype on the tensor in newer formats; rare here.
        return LazyTensor(self.path, storage.file_offset, storage.numel, dtype, int(offset),
                          tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _zip_offsets(path: str, zf: zipfile.ZipFile, prefix: str) -> dict[str, int]:
    """Storage key -> absolute offset of its bytes (records are stored, uncompressed)."""
    offsets = {}
    with open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(path, "has compressed tensor records",
                                      "re-save it with torch.save (which stores them uncompressed)")
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CheckpointError(path, "is corrupt (bad zip record header)",
                                      "download or copy the file again")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offsets[info.filename[len(prefix) + 5:]] = info.header_offset + 30 + name_len + extra_len
    return offsets


def load(path: str | os.PathLike) -> object:
    """Unpickle a checkpoint safely; tensors are ``LazyTensor`` records."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "does not exist or is not a file", "check the path")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not pkl:
                    raise CheckpointError(path, "is a zip file but not a torch checkpoint "
                                          "(no data.pkl)", "pass a metaseq checkpoint (.pt)")
                prefix = pkl[0][: -len("data.pkl")]
                offsets = _zip_offsets(path, zf, prefix)
                data = zf.read(pkl[0])
            obj = _SafeUnpickler(io.BytesIO(data), path, offsets).load()
        else:
            obj = _load_legacy(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error,
            ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise CheckpointError(path, f"is not a readable torch checkpoint ({type(e).__name__}: "
                              f"{e})", "it may be truncated or corrupt, or not a checkpoint at "
                              "all: download or copy it again") from None
    _check_bounds(path, obj)
    return obj


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(path: str) -> object:
    """torch's pre-1.6 format: magic, protocol, sys_info, the object, storage keys, raw data."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == b"PK\x03\x04":
            raise CheckpointError(path, "is truncated or corrupt: it starts like a torch zip "
                                  "checkpoint but its index at the end is missing",
                                  "download or copy the file again")
        if head[:1] != b"\x80":
            raise CheckpointError(path, "is not a torch checkpoint (neither a zip archive nor "
                                  "a pickle)", "pass a metaseq checkpoint file (.pt)")
        if _SafeUnpickler(f, path, {}).load() != _LEGACY_MAGIC:
            raise CheckpointError(path, "is a pickle but not a torch checkpoint",
                                  "pass a metaseq checkpoint file (.pt)")
        _SafeUnpickler(f, path, {}).load()  # protocol version
        _SafeUnpickler(f, path, {}).load()  # sys_info
        # The object names storages before their offsets are known: give each key a negative
        # stand-in offset, walk the storage section, then patch the real offsets in.
        stand_in = _StandIn()
        unpickler = _SafeUnpickler(f, path, stand_in)
        obj = unpickler.load()
        keys = _SafeUnpickler(f, path, {}).load()
        offsets: dict[int, int] = {}
        itemsize = {t.file_offset: t.itemsize for _, t in tensors(obj)}
        for key in keys:
            numel = struct.unpack("<q", f.read(8))[0]
            sentinel = stand_in[str(key)]
            offsets[sentinel] = f.tell()
            f.seek(numel * itemsize.get(sentinel, 1), os.SEEK_CUR)
    return _walk(obj, lambda t: dataclasses.replace(t, file_offset=offsets[t.file_offset]))


class _StandIn(dict):
    """Storage key -> a unique negative offset, made up on first use."""

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        self[key] = -(len(self) + 1)
        return self[key]


def _walk(obj, fn):
    if isinstance(obj, LazyTensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _walk(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_walk(v, fn) for v in obj)
    return obj


def tensors(obj, prefix: str = ""):
    """Yield (dotted path, LazyTensor) for every tensor inside ``obj``."""
    if isinstance(obj, LazyTensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _check_bounds(path: str, obj) -> None:
    size = Path(path).stat().st_size
    for name, t in tensors(obj):
        first, count = t._span()
        if t.file_offset < 0 or t.file_offset + (first + count) * t.itemsize > size:
            raise CheckpointError(path, f"is truncated: tensor {name} ends past the end of the "
                                  f"file ({size} bytes)", "download or copy the file again")
