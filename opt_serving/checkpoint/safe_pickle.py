"""Read ``torch.save`` files without executing pickled code, and without reading the weights.

Threat model. A checkpoint is a pickle from the internet. Whatever its bytes, loading it may
only (a) build plain data: containers, numbers, strings, ``argparse.Namespace``,
``OrderedDict``, torch dtypes; (b) record objects of metaseq / fairseq / omegaconf / numpy as
inert ``Placeholder``s that hold their arguments and never run; (c) describe tensors as
``LazyTensor`` records of bytes inside this file. It may not make us:

- call or import anything else: ``find_class`` answers from fixed tables and never imports or
  touches a module attribute by a name from the file (``_resolve``);
- patch a class or one of our records: BUILD / SETSTATE is allowed only on the Placeholder,
  Namespace and OrderedDict instances this unpickler made, with a dict of plain names
  (``_build``); NEWOBJ / OBJ / INST only make those (``_new``);
- read bytes outside a tensor's own storage, or a storage outside the file: every record is
  checked against its storage (``lazy_tensor.check_extent``) and every storage against its
  zip record and the file size (``torch_file``, ``persistent_load``);
- use unbounded memory or time: the pickle is capped at MAX_PICKLE_BYTES after inflation,
  at MAX_OPS opcodes and MAX_OBJECTS instances; builtins that size their output from an
  argument (bytearray, set, range, torch.Size) are capped (``_bounded``); the memo is a dict
  (the C unpickler would allocate up to a 2**31-entry array for one LONG_BINPUT);
- hand callers a structure they cannot walk: after loading, ``check_tree`` walks the result
  iteratively and refuses nesting deeper than MAX_DEPTH, cycles, more than MAX_VISITS nodes,
  bare classes or functions, and placeholders or tensors used as dict keys or set members.

Every refusal is a ``CheckpointError`` naming the file; nothing from the file ever runs.
``torch_file.load`` is the entry point: it reads both layouts (the zip format of torch >= 1.6
and the legacy sequential one) with this unpickler.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import struct
from dataclasses import dataclass

import torch

from .errors import CheckpointError
from .lazy_tensor import MAX_DIMS, STORAGE_DTYPES, STORAGE_NAMES, LazyTensor, check_extent, itemsize

__all__ = ["LazyTensor", "Placeholder", "STORAGE_NAMES", "check_tree", "MAX_PICKLE_BYTES"]

MAX_PICKLE_BYTES = 64 << 20  # a BB3-175B data.pkl is ~200 KB
MAX_OPS = 4_000_000
MAX_OBJECTS = 200_000  # placeholders, namespaces, OrderedDicts (one per tensor's hooks)
MAX_ITEMS = 1_000_000  # elements one allowed builtin may be asked to build
MAX_BYTEARRAY = 16 << 20
MAX_DEPTH = 100
MAX_VISITS = 4_000_000

# Objects of these packages are data containers in real checkpoints (training state,
# tokenization caches, configs): kept as inert records, never instantiated.
_INERT_PACKAGES = ("metaseq", "fairseq", "omegaconf", "numpy", "typing")
# torch dtypes by name, from what is already in torch's namespace: a lookup by a name from the
# file must not trigger torch's lazy submodule imports (``torch._inductor``: 110 modules).
_TORCH_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype)


def refuse(path: str, problem: str) -> CheckpointError:
    return CheckpointError(path, problem, "use checkpoints from a trusted source; if this one "
                           "is genuine, re-save it with plain tensors and dicts")


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


def _is_scalar_key(obj) -> bool:
    """What may be a dict key or a set member: plain scalars and tuples of them."""
    if isinstance(obj, tuple):
        return all(_is_scalar_key(v) for v in obj)
    return isinstance(obj, _SCALARS)


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with an allow-list, bounded work and a guarded BUILD."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: str, records: dict[str, tuple[int, int]] | None):
        super().__init__(file)
        self.path = path
        self.records = records  # storage key -> (file offset, bytes); None: legacy stand-ins
        self.placeholders: dict[tuple[str, str], type] = {}
        self.ops = self.objects = 0
        # The instances made here, by id (BUILD may touch only these); holding them keeps
        # their ids from being reused while loading.
        self._made: dict[int, object] = {}
        self.legacy_refs: dict[str, _StorageRef] = {}

    # -- bounded work ----------------------------------------------------------------------

    def load(self):
        try:
            return super().load()
        except RecursionError:
            raise refuse(self.path, "is nested too deeply to unpickle") from None

    def _count(self) -> None:
        self.ops += 1
        if self.ops > MAX_OPS:
            raise refuse(self.path, f"has a pickle of more than {MAX_OPS} operations, far "
                          "beyond any real checkpoint")

    def _instance(self, obj):
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise refuse(self.path, f"makes more than {MAX_OBJECTS} objects")
        self._made[id(obj)] = obj
        return obj

    # -- what names resolve to ---------------------------------------------------------------

    def find_class(self, module: str, name: str):
        found = self._resolve(module, name)
        if found is None:
            raise refuse(self.path, f"contains a pickled reference to {module}.{name}, which "
                          "is not a tensor or a plain container: loading it could run code, "
                          "so it was refused (nothing was executed)")
        return found

    def _resolve(self, module: str, name: str):
        """From fixed tables only: no import, no attribute lookup on a module."""
        if module == "torch._utils":
            return {"_rebuild_tensor_v2": self._rebuild_tensor,
                    "_rebuild_tensor": self._rebuild_tensor,
                    "_rebuild_parameter": _rebuild_parameter}.get(name)
        if module == "torch":
            if name == "Size":
                return self._bounded(tuple, dims=True)
            if name in STORAGE_DTYPES:
                return _StorageType(STORAGE_DTYPES[name])
            return _TORCH_DTYPES.get(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if module in ("builtins", "__builtin__"):
            kinds = {"set": set, "frozenset": frozenset, "bytearray": bytearray,
                     "range": range, "slice": slice, "complex": complex}
            return self._bounded(kinds[name]) if name in kinds else None
        if module.split(".")[0] in _INERT_PACKAGES:
            key = (module, name)
            if key not in self.placeholders:
                self.placeholders[key] = type(name, (Placeholder,),
                                              {"_module": module, "_name": name})
            return self.placeholders[key]
        return None

    def _bounded(self, kind, dims: bool = False):
        """``kind(*args)`` for an allowed builtin, refusing outputs sized by an argument."""
        limit = MAX_DIMS if dims else MAX_ITEMS

        def make(*args):
            for a in args:
                if isinstance(a, int) and not isinstance(a, bool):
                    if kind is bytearray and not 0 <= a <= MAX_BYTEARRAY:
                        raise refuse(self.path, f"asks for a bytearray of {a} bytes")
                    if kind is range and abs(a) > MAX_ITEMS:
                        raise refuse(self.path, f"asks for a range up to {a}")
                elif isinstance(a, (list, tuple, set, frozenset, range, bytes, bytearray, str)):
                    if len(a) > limit:
                        raise refuse(self.path, f"asks for a {kind.__name__} of {len(a)} "
                                      f"items (at most {limit})")
                    if kind in (set, frozenset) and not all(_is_scalar_key(v) for v in a):
                        raise refuse(self.path, f"puts an object into a {kind.__name__}")
                elif not _is_scalar_key(a):
                    raise refuse(self.path, f"passes {type(a).__name__} to {kind.__name__}")
            if dims:
                return tuple(int(d) for d in (args[0] if args else ()))
            return kind(*args)
        make.__qualname__ = f"bounded {kind.__name__}"
        return make

    # -- opcodes that make or change objects -------------------------------------------------

    def _new(self, cls, args, kwargs=None):
        """NEWOBJ / NEWOBJ_EX / OBJ / INST: only placeholders and plain containers."""
        kwargs = kwargs or {}
        if isinstance(cls, type) and issubclass(cls, Placeholder) and \
                cls in self.placeholders.values():
            return self._instance(cls(*args, **kwargs))
        if cls in (collections.OrderedDict, argparse.Namespace) and not args and not kwargs:
            return self._instance(cls())
        raise refuse(self.path, f"asks to create an object of {_describe(cls)} directly")

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass, args):
        self.append(self._new(klass, tuple(args)))

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, type):  # only what _new allows: placeholders, plain containers
            self.stack[-1] = self._new(func, args)
            return
        if not callable(func):
            raise refuse(self.path, f"asks to call {_describe(func)}")
        self.stack[-1] = func(*args)

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(inst) not in self._made or isinstance(inst, type):
            raise refuse(self.path, f"asks to set the state of {_describe(inst)} (only the "
                          "inert records this reader made may get state)")
        if isinstance(inst, Placeholder):
            inst.__setstate__(state)
            return
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if state is None:
            return
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and not k.startswith("__") for k in state):
            raise refuse(self.path, f"gives {type(inst).__name__} a state that is not a dict "
                          "of plain attribute names")
        inst.__dict__.update(state)

    def _load_long_binput(self):
        i, = struct.unpack("<I", self.read(4))
        if i > MAX_OPS:  # memo indices count up from 0, one per object at most
            raise refuse(self.path, f"has a pickle memo index of {i}")
        self.memo[i] = self.stack[-1]

    def _wrap(op):
        def counted(self):
            self._count()
            op(self)
        return counted

    for _code, _op in list(dispatch.items()):
        dispatch[_code] = _wrap(_op)
    dispatch[pickle.NEWOBJ[0]] = _wrap(_load_newobj)
    dispatch[pickle.NEWOBJ_EX[0]] = _wrap(_load_newobj_ex)
    dispatch[pickle.REDUCE[0]] = _wrap(_load_reduce)
    dispatch[pickle.BUILD[0]] = _wrap(_build)
    dispatch[pickle.LONG_BINPUT[0]] = _wrap(_load_long_binput)
    del _code, _op, _wrap

    # -- tensors -------------------------------------------------------------------------------

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(self.path, f"has an unknown persistent id {str(pid)[:80]}",
                                  "this is not a torch checkpoint this tool can read")
        _, stype, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise CheckpointError(self.path, "uses legacy storage views",
                                  "re-save it with torch >= 1.6 (zip format)")
        dtype = stype.dtype if isinstance(stype, _StorageType) else torch.uint8
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(self.path, f"has a storage of {numel!r} elements",
                                  "the file is corrupt: download it again")
        key = str(key)
        if self.records is None:  # legacy: offsets are patched in once the data is found
            stand_in = -(len(self.legacy_refs) + 1)
            ref = self.legacy_refs.setdefault(key, _StorageRef(key, dtype, numel, stand_in))
            if (ref.dtype, ref.numel) != (dtype, numel):
                raise CheckpointError(self.path, f"describes storage {key} in two ways",
                                      "the file is corrupt: download it again")
            return ref
        if key not in self.records:
            raise CheckpointError(self.path, f"references tensor data {key!r} that is missing",
                                  "the file is truncated or corrupt: download it again")
        offset, nbytes = self.records[key]
        if numel * itemsize(dtype) != nbytes:
            raise CheckpointError(self.path, f"says storage {key} holds {numel} {dtype} "
                                  f"elements but its record has {nbytes} bytes",
                                  "the file is corrupt: download it again")
        return _StorageRef(key, dtype, numel, offset)

    def _rebuild_tensor(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _StorageRef):
            raise CheckpointError(self.path, "has a tensor without storage", "file is corrupt")
        size = tuple(size) if isinstance(size, (tuple, list)) else size
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else stride
        wrong = check_extent(offset, size, stride, storage.numel)
        if wrong:
            raise CheckpointError(self.path, f"has a tensor record with {wrong}",
                                  "the file is corrupt or crafted: use the original file")
        return LazyTensor(self.path, storage.file_offset, storage.numel, storage.dtype,
                          offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


def _describe(obj) -> str:
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return f"the class {obj._module}.{obj._name}"
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__}"


# -- after loading: a structure callers can walk --------------------------------------------

def _children(obj):
    """(child, as_key) pairs of an allowed object; as_key: used as a dict key or set member."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, True
            yield v, False
    elif isinstance(obj, (set, frozenset)):
        for v in obj:
            yield v, True
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield v, False
    elif isinstance(obj, Placeholder):
        yield obj.args, False
        yield obj.kwargs, False
        yield obj.state, False
    if isinstance(obj, (argparse.Namespace, collections.OrderedDict)):
        yield vars(obj), False


def check_tree(path: str, root) -> None:
    """Iterative, so a deep structure cannot exhaust the stack here; see the threat model."""
    todo = [(root, 0, False)]
    on_path: list[int] = []  # ids of the containers from the root to the current one
    visits = 0
    while todo:
        obj, depth, as_key = todo.pop()
        if obj is _EXIT:
            on_path.pop()
            continue
        visits += 1
        if visits > MAX_VISITS:
            raise refuse(path, f"holds a structure of more than {MAX_VISITS} nodes (shared "
                          "or repeated containers)")
        if depth > MAX_DEPTH:
            raise refuse(path, f"nests containers more than {MAX_DEPTH} deep (or a container "
                          "holds itself)")
        if as_key and not _is_scalar_key(obj):
            raise refuse(path, f"uses {_describe(obj)} as a dict key or set member")
        if isinstance(obj, (type, _StorageType, _StorageRef)) or callable(obj):
            raise refuse(path, f"holds {_describe(obj)} itself where data belongs")
        if isinstance(obj, _SCALARS + (bytearray, slice, range, LazyTensor)):
            continue
        if id(obj) in on_path:
            raise refuse(path, "holds a container that contains itself")
        on_path.append(id(obj))
        todo.append((_EXIT, depth, False))
        todo.extend((child, depth + 1, key) for child, key in _children(obj))


_EXIT = object()  # marks leaving a container in check_tree
