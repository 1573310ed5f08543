"""Write ``torch.save``-compatible checkpoints one tensor at a time.

``torch.save`` needs every tensor in memory before it writes. We know every output shape in
advance, so the pickle (``data.pkl``) is written first with ``TensorSpec`` stand-ins and each
tensor's bytes follow as they are produced: a writer holds only the tensors queued on it (its
own thread writes them in order). The file is hashed (sha256) as it streams out, written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import pickle
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import CheckpointError
from .lazy_tensor import STORAGE_NAMES

PARALLEL_HASH_BYTES = 1 << 20  # smaller writes (zip headers) are hashed inline


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written later: its place in the pickle and its storage key."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class _StorageId:
    def __init__(self, spec: TensorSpec):
        self.spec = spec


class _SpecPickler(pickle.Pickler):
    """Pickles TensorSpec exactly as torch.save pickles a contiguous tensor."""

    def reducer_override(self, obj):
        if isinstance(obj, TensorSpec):
            stride, acc = [], 1
            for s in reversed(obj.shape):
                stride.append(acc)
                acc *= s
            return (torch._utils._rebuild_tensor_v2,
                    (_StorageId(obj), 0, tuple(obj.shape), tuple(reversed(stride)), False,
                     collections.OrderedDict()))
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageId):
            spec = obj.spec
            return ("storage", getattr(torch, STORAGE_NAMES[spec.dtype]), spec.key, "cpu",
                    spec.numel)
        return None


class _HashingFile(io.RawIOBase):
    """The sink of torch's C++ zip writer. Errors never cross into C++: a failed write (disk
    full) is recorded and re-raised by ``CheckpointWriter`` once the C++ call returns, because
    the zip writer's state is broken after an exception, and its destructor (which finalises
    the archive through us) would then abort the whole process."""

    def __init__(self, f, pool: ThreadPoolExecutor):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.pool = pool
        self.error: OSError | None = None
        self.discard = False  # set on abort: swallow whatever the zip writer still writes

    def writable(self):
        return True

    def write(self, b):
        if self.discard or self.error is not None:
            return len(b)
        # A tensor's bytes arrive in one call: hash them on another core while this one
        # writes (both release the GIL), so hashing costs no extra time. ``b`` is only valid
        # during this call, hence the wait in ``finally``.
        digest = self.pool.submit(self.sha.update, b) if len(b) >= PARALLEL_HASH_BYTES else None
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            return len(b)
        finally:
            if digest is not None:
                digest.result()
            else:
                self.sha.update(b)
        self.size += n
        return n


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space" in text or "file too large" in text or "file write failed" in text


class CheckpointWriter:
    """``with CheckpointWriter(path, obj) as w: w.write(spec, tensor)`` for every spec in obj.

    ``obj`` is the checkpoint dict with ``TensorSpec`` leaves. Nothing appears at ``path``
    unless every tensor was written; on any error the temporary file is removed.
    ``submit`` is ``write`` on the writer's own thread, so the caller can prepare the next
    tensor while this one goes to disk.
    """

    def __init__(self, path: str | os.PathLike, obj: object):
        self.path = str(path)
        self.tmp = f"{self.path}.partial-{os.getpid()}"
        buf = io.BytesIO()
        _SpecPickler(buf, protocol=2).dump(obj)
        self._pickle = buf.getvalue()
        self.pending: dict[str, TensorSpec] = {}
        self._collect(obj)
        self.sha256 = ""
        self.size = 0

    def _collect(self, obj):
        if isinstance(obj, TensorSpec):
            self.pending[obj.key] = obj
        elif isinstance(obj, dict):
            for v in obj.values():
                self._collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self._collect(v)

    def __enter__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        # One thread: records reach the file in submission order.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-write")
        self._failed: BaseException | None = None
        self._file = open(self.tmp, "wb")
        self._hash = _HashingFile(self._file, self._pool)
        self._zip = torch._C.PyTorchFileWriter(self._hash)
        try:
            self._guard(self._write_header)
        except BaseException:  # __exit__ is not called when __enter__ fails
            self._abort()
            raise
        return self

    def _write_header(self):
        self._zip.write_record("data.pkl", self._pickle, len(self._pickle))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", "64", 2)
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def write(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        self.submit(spec, tensor).result()

    def submit(self, spec: TensorSpec, tensor: torch.Tensor) -> Future:
        """Queue ``tensor``; it must stay unchanged until the returned future is done."""
        if self.pending.pop(spec.key, None) is None:
            raise RuntimeError(f"tensor {spec.key} is not expected or was already written")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"tensor {spec.key}: got {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {spec.shape} {spec.dtype}")
        return self._io.submit(self._write_record, spec, tensor)

    def _write_record(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        if self._failed is not None:
            raise self._failed  # the file is already broken: later records are moot
        try:
            t = tensor.detach().to("cpu").contiguous()
            # A contiguous view into a larger tensor (a rank's rows of the full embedding) is
            # written in place: slicing an untyped storage makes a view of its bytes, no copy.
            start = t.storage_offset() * t.element_size()
            data = t.untyped_storage()[start:start + spec.nbytes]
            self._guard(lambda: self._zip.write_record(f"data/{spec.key}", data, spec.nbytes))
        except BaseException as e:
            self._failed = e
            raise

    def _guard(self, fn):
        try:
            fn()
            if self._hash.error is not None:
                raise self._hash.error
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise CheckpointError(self.path, "could not be written: the disk is full "
                                      f"({e})", "free space or choose another --output-dir; "
                                      "nothing was left behind") from None
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            self._io.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)
            if exc_type is None:
                if self._failed is not None:
                    raise self._failed
                if self.pending:
                    raise RuntimeError(f"{len(self.pending)} tensors were never written to "
                                       f"{self.path}")
                self._guard(self._zip.write_end_of_file)
                self._guard(self._file.flush)
                self._guard(lambda: os.fsync(self._file.fileno()))
        except BaseException:
            self._abort()
            raise
        if exc_type is not None:
            self._abort()
            return False
        self._pool.shutdown()
        self._file.close()
        self.sha256, self.size = self._hash.sha.hexdigest(), self._hash.size
        os.replace(self.tmp, self.path)
        return False

    def _abort(self):
        self._io.shutdown(wait=True, cancel_futures=True)  # no write may run past this point
        self._hash.discard = True
        self._zip = None  # finalise the zip writer (into the void) before the file closes
        self._pool.shutdown()
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
