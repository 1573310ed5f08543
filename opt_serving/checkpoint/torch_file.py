"""Reading a ``torch.save`` file: its layout (zip, or torch's legacy sequential format), its
pickle through the safe unpickler (``safe_pickle``, whose header states the threat model),
and its tensors as ``LazyTensor`` records; no weight is read here.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
import zipfile

from .errors import CheckpointError
from .lazy_tensor import LazyTensor, itemsize
from .safe_pickle import MAX_OBJECTS, MAX_PICKLE_BYTES, SafeUnpickler, check_tree, refuse


def _zip_records(path: str, zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[int, int]]:
    """Storage key -> (absolute offset, size) of its bytes (records are stored, uncompressed)."""
    records = {}
    size = os.path.getsize(path)
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
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > size:
                raise CheckpointError(path, f"is truncated: tensor data {info.filename} ends "
                                      f"past the end of the file ({size} bytes)",
                                      "download or copy the file again")
            records[info.filename[len(prefix) + 5:]] = (start, info.file_size)
    return records


def _read_pickle(path: str, zf: zipfile.ZipFile, name: str) -> bytes:
    """data.pkl, inflated at most to MAX_PICKLE_BYTES (a small zip may inflate to GiBs)."""
    with zf.open(name) as f:
        data = f.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise refuse(path, f"has a pickle (data.pkl) larger than {MAX_PICKLE_BYTES >> 20} MiB "
                      "once inflated; real checkpoints hold well under 1 MiB")
    return data


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
                records = _zip_records(path, zf, prefix)
                data = _read_pickle(path, zf, pkl[0])
            obj = SafeUnpickler(io.BytesIO(data), path, records).load()
            check_tree(path, obj)
        else:
            obj = _load_legacy(path)
    except CheckpointError:
        raise
    except RecursionError:
        raise refuse(path, "is nested too deeply to read") from None
    except MemoryError:
        raise refuse(path, "needs more memory to unpickle than this machine has") from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error, OSError,
            ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
            NotImplementedError, zipfile.LargeZipFile) as e:
        raise CheckpointError(path, f"is not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]})", "it may be truncated or corrupt, or not a "
                              "checkpoint at all: download or copy it again") from None
    return obj


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(path: str) -> object:
    """torch's pre-1.6 format: magic, protocol, sys_info, the object, storage keys, raw data
    (each storage: its element count as int64, then its bytes)."""
    size = os.path.getsize(path)
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
        if SafeUnpickler(f, path, {}).load() != _LEGACY_MAGIC:
            raise CheckpointError(path, "is a pickle but not a torch checkpoint",
                                  "pass a metaseq checkpoint file (.pt)")
        SafeUnpickler(f, path, {}).load()  # protocol version
        SafeUnpickler(f, path, {}).load()  # sys_info
        unpickler = SafeUnpickler(f, path, None)
        obj = unpickler.load()
        keys = SafeUnpickler(f, path, {}).load()
        if not isinstance(keys, list) or len(keys) > MAX_OBJECTS:
            raise CheckpointError(path, "(legacy format) has no valid list of storage keys",
                                  "the file is truncated or corrupt: download it again")
        offsets: dict[str, int] = {}
        for key in keys:
            ref = unpickler.legacy_refs.get(str(key))
            head = f.read(8)
            if ref is None or len(head) < 8:
                raise CheckpointError(path, f"(legacy format) has storage {key!r} without a "
                                      "tensor, or ends before it", "the file is truncated or "
                                      "corrupt: download it again")
            numel = struct.unpack("<q", head)[0]
            nbytes = numel * itemsize(ref.dtype)
            if numel != ref.numel or f.tell() + nbytes > size:
                raise CheckpointError(path, f"(legacy format) storage {key} holds {numel} "
                                      f"elements where {ref.numel} were described, or ends "
                                      "past the end of the file", "the file is truncated or "
                                      "corrupt: download it again")
            offsets[str(key)] = f.tell()
            f.seek(nbytes, os.SEEK_CUR)
    missing = set(unpickler.legacy_refs) - set(offsets)
    if missing:
        raise CheckpointError(path, f"(legacy format) lacks the data of storage "
                              f"{sorted(missing)[0]}", "the file is truncated: download it again")
    check_tree(path, obj)
    # Records carry their storage's stand-in offset (negative, unique per key) until now.
    real = {ref.file_offset: offsets[key] for key, ref in unpickler.legacy_refs.items()}
    return _walk(obj, lambda t: dataclasses.replace(t, file_offset=real[t.file_offset]))


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
