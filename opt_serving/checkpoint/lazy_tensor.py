"""``LazyTensor``: a tensor record of a checkpoint file, read only when asked.

The unpickler (``safe_pickle``) makes these; it has already checked that the record stays
inside its own storage and the storage inside the file, so ``read`` and ``mmap`` only ever
touch bytes of the storage the record names.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass

import torch

from .errors import CheckpointError

STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
STORAGE_NAMES = {v: k for k, v in STORAGE_DTYPES.items()}
MAX_DIMS = 16


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def span(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int]:
    """(first element, element count) of the storage range a view touches."""
    if math.prod(shape) == 0:
        return offset, 0
    last = offset + sum((s - 1) * st for s, st in zip(shape, stride))
    return offset, last - offset + 1


def check_extent(offset, shape, stride, storage_numel: int) -> str | None:
    """What is wrong with a view (offset, shape, stride) of a storage of ``storage_numel``
    elements, or None. Views must stay inside their storage: zero and negative strides are
    refused (they would let one record alias or walk backwards over other bytes)."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        return f"a negative or non-integer storage offset ({offset!r})"
    if not (isinstance(shape, tuple) and isinstance(stride, tuple)) or len(shape) != len(stride):
        return "a shape and stride of different lengths"
    if len(shape) > MAX_DIMS:
        return f"{len(shape)} dimensions (at most {MAX_DIMS})"
    for s, st in zip(shape, stride):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, st)):
            return "a non-integer size or stride"
        if s < 0:
            return f"a negative size ({s})"
        if s > 1 and st < 1:
            return f"a stride of {st} (zero and negative strides are refused)"
    first, count = span(offset, shape, stride)
    if count and first + count > storage_numel:
        return (f"a view (offset {offset}, shape {list(shape)}, stride {list(stride)}) that "
                f"ends past its storage of {storage_numel} elements")
    return None


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
        return itemsize(self.dtype)

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
        return span(self.storage_offset, self.shape, self.stride)

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
