"""Hand-made torch checkpoint files for the hostile-input tests: raw pickle opcodes, so a test
can say exactly what an attacker's file says (torch.save would never write these).

``Ops`` builds a protocol-2 pickle; ``write_zip`` lays it out as torch's zip format with the
given storage records; ``tensor`` pushes a ``_rebuild_tensor_v2`` call for a storage.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path


class Ops:
    """A pickle program: each method appends opcodes and returns self."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")

    def raw(self, data: bytes) -> "Ops":
        self.b += data
        return self

    def glob(self, module: str, name: str) -> "Ops":
        return self.raw(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def str(self, s: str) -> "Ops":
        data = s.encode()
        return self.raw(b"X" + struct.pack("<I", len(data)) + data)

    def int(self, i: int) -> "Ops":
        if -(1 << 31) <= i < (1 << 31):
            return self.raw(b"J" + struct.pack("<i", i))
        data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
        return self.raw(b"\x8a" + bytes([len(data)]) + data)

    def tuple(self, *items) -> "Ops":
        self.raw(b"(")
        for item in items:
            self.value(item)
        return self.raw(b"t")

    def value(self, v) -> "Ops":
        if isinstance(v, Ops):
            return self.raw(bytes(v.b[2:]))
        if isinstance(v, bool):
            return self.raw(b"\x88" if v else b"\x89")
        if isinstance(v, int):
            return self.int(v)
        if isinstance(v, str):
            return self.str(v)
        if v is None:
            return self.raw(b"N")
        if isinstance(v, tuple):
            return self.tuple(*v)
        raise TypeError(type(v))

    def call(self, module: str, name: str, *args) -> "Ops":
        """module.name(*args) via REDUCE."""
        return self.glob(module, name).tuple(*args).raw(b"R")

    def tensor(self, key: str, numel: int, offset: int, size: tuple, stride: tuple,
               storage: str = "FloatStorage") -> "Ops":
        self.glob("torch._utils", "_rebuild_tensor_v2").raw(b"(")
        self.raw(b"(").str("storage").glob("torch", storage).str(key).str("cpu").int(numel)
        self.raw(b"tQ")  # the persistent id tuple, then BINPERSID
        self.value(offset).value(size).value(stride).value(False)
        self.glob("collections", "OrderedDict").raw(b")R")
        return self.raw(b"tR")

    def dict(self, **items) -> "Ops":
        self.raw(b"}(")
        for k, v in items.items():
            self.str(k).value(v)
        return self.raw(b"u")

    def done(self) -> bytes:
        return bytes(self.b + b".")


def write_zip(path: str | Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None,
              compress_pickle: bool = False) -> Path:
    """torch's zip layout: archive/data.pkl, archive/data/<key>, archive/version."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes,
                    compress_type=zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return path
