"""Reading PyTorch .pth files without torch, and without running them.

A .pth written by torch.save (torch >= 1.6) is a zip archive: `<name>/data.pkl`, a
pickle of the saved object, and `<name>/data/<key>`, the raw bytes of each tensor's
storage. A pickle is a program: unpickling calls whatever functions it names. Here
it is read by an Unpickler whose find_class knows only a short allow-list, and each
allowed name maps to a stand-in written here, so no function named by the file, not
even one of torch's, is ever called. Anything else is refused before it could run.

The stand-ins are made afresh for each load and refuse BUILD (the opcode that sets an
object's state), so a file, even one that is refused halfway, cannot change how the next
file is read. timm's training checkpoints pickle their `args` (an argparse.Namespace):
that name maps to a stand-in class that takes its fields as data, and reads back as a
types.SimpleNamespace; argparse is never imported.

    read_pth(path) -> the saved object, with NumPy arrays in place of tensors
"""
import io
import math
import os
import pickle
import pickletools
import types
import zipfile
from collections import OrderedDict

import numpy as np

from ..config import is_int


class PthError(ValueError):
    """A .pth that cannot or may not be read; the message names the file and the problem."""


class _Frozen:
    """A stand-in that the pickle cannot change: BUILD (its __setstate__, or setattr for slot
    state) is refused."""
    __slots__ = ()
    _what = "a stand-in"

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"BUILD applied to {self._what}")

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD applied to {self._what}")

    def __reduce__(self):  # never pickled again; keeps it inert if anything tries
        raise TypeError("not picklable")


class _StorageType(_Frozen):
    """Stands in for torch.FloatStorage & co.: only says which dtype the bytes hold."""
    __slots__ = ("name", "dtype")
    _what = "a storage type"

    def __init__(self, name, dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)


class _Call(_Frozen):
    """An allowed function, wrapped so that BUILD cannot reach it (a function's __defaults__
    and __dict__ are writable)."""
    __slots__ = ("fn",)
    _what = "an allowed function"

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _NamespaceStandIn:
    """Stands in for argparse.Namespace (timm's checkpoints pickle their args): NEWOBJ makes
    one with no arguments, BUILD gives it one dict of named fields; nothing else."""
    __slots__ = ("fields",)

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise pickle.UnpicklingError("argparse.Namespace made with arguments")

    def __setstate__(self, state):
        if hasattr(self, "fields"):
            raise pickle.UnpicklingError("BUILD applied twice to a Namespace")
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise pickle.UnpicklingError("a Namespace whose state is not a dict of names")
        self.fields = dict(state)

    def __reduce__(self):
        raise TypeError("not picklable")


# storage type -> little-endian NumPy dtype; bf16 is read as its 16 bits, widened later
_STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
             "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "?"}


class _Storage:
    """One storage's bytes (read lazily from the archive) as a flat array."""
    __slots__ = ("reader", "key", "type", "numel", "_array")

    def __init__(self, reader, key, storage_type, numel):
        self.reader, self.key, self.type, self.numel, self._array = reader, key, storage_type, numel, None

    def array(self):
        if self._array is None:
            self._array = self.reader.storage_array(self)
        return self._array

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD applied to a storage")


class _Tensor:
    """A tensor not yet read: storage, offset, size and stride, as _rebuild_tensor_v2 gets them."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    @property
    def shape(self):
        return self.size

    @property
    def dtype(self):
        return np.dtype(np.float32) if self.storage.type.name == "BFloat16Storage" else np.dtype(self.storage.type.dtype)

    def numpy(self):
        """The tensor's values as a new, contiguous array (bf16 widened to float32)."""
        flat = self.storage.array()
        if 0 in self.size:
            out = np.empty(self.size, flat.dtype)
        else:
            out = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                                  strides=[s * flat.itemsize for s in self.stride]).copy()
        if self.storage.type.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD applied to a tensor")


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: checks the view lies inside its storage."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    if not (is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(is_int(v) and v >= 0 for v in size + stride)):
        raise pickle.UnpicklingError(f"a tensor with offset {offset!r}, size {size!r}, stride {stride!r}")
    if math.prod(size) > storage.numel:  # a broadcast view (stride 0): checkpoints never hold one
        raise pickle.UnpicklingError(f"a tensor of size {size} has more elements than its storage's {storage.numel}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise pickle.UnpicklingError(f"a tensor of size {size} reaches element {last} "
                                         f"of a storage of {storage.numel}")
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stands in for torch._utils._rebuild_parameter: a Parameter is its tensor."""
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data


def _encode(text, encoding="latin1"):
    """Stands in for _codecs.encode, which protocol-2 pickles use to spell bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with other than (str, 'latin1')")
    return text.encode("latin1")


def _set(items=()):
    return set(_plain_items(items))


def _frozenset(items=()):
    return frozenset(_plain_items(items))


def _plain_items(items):
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError("a set built from other than a list")
    return items


def _ordered_dict(items=()):
    return OrderedDict(_plain_items(items))


def allowed():
    """(module, name) the file may name -> what it gets instead: new objects for every load.
    Nothing else is reachable."""
    namespace = type("Namespace", (_NamespaceStandIn,), {"__slots__": ()})  # a class: NEWOBJ needs one
    return {
        ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
        ("collections", "OrderedDict"): _Call(_ordered_dict),
        ("builtins", "set"): _Call(_set), ("__builtin__", "set"): _Call(_set),
        ("builtins", "frozenset"): _Call(_frozenset), ("__builtin__", "frozenset"): _Call(_frozenset),
        ("_codecs", "encode"): _Call(_encode),
        ("argparse", "Namespace"): namespace,
        **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGES.items()},
    }


ALLOWED_NAMES = tuple(allowed())  # for documentation and tests


class Refused(PthError):
    """The file's pickle names a global outside the allow-list; nothing was called."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, reader):
        super().__init__(io.BytesIO(data))
        self.reader = reader
        self.allowed = allowed()  # this load's own stand-ins

    def find_class(self, module, name):  # every GLOBAL, STACK_GLOBAL, INST and EXT opcode comes here
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"{self.reader.path}: refused: its pickle calls {module}.{name}, which is not "
                          "a tensor, a storage or a plain container (a .pth is a program; only data is "
                          "read, and nothing was run)") from None

    def persistent_load(self, pid):  # ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[1] is self.allowed.get(("torch", pid[1].name))
                and isinstance(pid[2], str) and is_int(pid[4])
                and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        return self.reader.storage(pid[2], pid[1], pid[4])


class _Archive:
    def __init__(self, path, zf, prefix, byteorder):
        self.path, self.zf, self.prefix, self.byteorder = path, zf, prefix, byteorder
        self.storages = {}

    def storage(self, key, storage_type, numel):
        if key in self.storages:
            known = self.storages[key]
            if known.type is not storage_type or known.numel != numel:
                raise pickle.UnpicklingError(f"storage {key!r} is declared twice, differently")
            return known
        self.storages[key] = s = _Storage(self, key, storage_type, numel)
        return s

    def storage_array(self, s):
        name = f"{self.prefix}data/{s.key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise PthError(f"{self.path}: storage {name} is missing from the archive (truncated?)") from None
        dtype = np.dtype(s.type.dtype)
        if info.file_size != s.numel * dtype.itemsize:
            raise PthError(f"{self.path}: storage {name} holds {info.file_size} bytes, its tensors need "
                           f"{s.numel} × {dtype.itemsize}")
        data = _read_entry(self.path, self.zf, info)
        if self.byteorder == "big":
            dtype = dtype.newbyteorder(">")
        return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def _read_entry(path, zf, info):
    if info.compress_type != zipfile.ZIP_STORED:
        raise PthError(f"{path}: {info.filename} is compressed, which torch.save never does: not a torch checkpoint")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise PthError(f"{path}: cannot read {info.filename} ({e}): the file is truncated or damaged") from None


def read_pth(path, *, load=True):
    """The object a torch zip-format .pth holds, with tensors as NumPy arrays.

    load=False leaves tensors unread (objects with .shape and .dtype; the archive is closed
    on return): enough to look at names and shapes without reading the data. Raises PthError (a ValueError) naming the file and the problem;
    Refused for a pickle that names anything but tensors, storages and plain containers.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:  # OSError (missing, unreadable) as is
        head = f.read(4)
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            if head[:3] == b"\x80\x02\x8a":  # torch < 1.6 wrote a pickled magic number, then pickles
                raise PthError(f"{path}: a legacy (torch < 1.6) .pth, not a zip archive: load it in torch and "
                               "save it again with torch.save, or use the safetensors file") from None
            raise PthError(f"{path}: not a zip archive ({e}): truncated, or not a .pth written by torch.save") from None
        with zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise PthError(f"{path}: a zip archive without one <name>/data.pkl: not a torch checkpoint")
            prefix = pickles[0][:-len("data.pkl")]
            byteorder = "little"
            if prefix + "byteorder" in zf.namelist():
                byteorder = _read_entry(path, zf, zf.getinfo(prefix + "byteorder")).decode("ascii", "replace")
                if byteorder not in ("little", "big"):
                    raise PthError(f"{path}: unknown byte order {byteorder[:20]!r}")
            archive = _Archive(path, zf, prefix, byteorder)
            data = _read_entry(path, zf, zf.getinfo(pickles[0]))
            try:
                _scan(data)
                obj = _Unpickler(data, archive).load()
            except PthError:
                raise
            except Exception as e:  # noqa: BLE001 - any malformed pickle ends in one line
                raise PthError(f"{path}: malformed pickle in {pickles[0]} "
                               f"({type(e).__name__}: {str(e)[:120]})") from None
            return _materialize(obj, path) if load else obj


# protocol-5 out-of-band buffers: torch.save never writes them, and they only widen what a file can do
_REFUSED_OPCODES = {"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"}


def _scan(data):
    """Walk the opcodes first (pickletools parses without building anything): a length that
    runs past the end is an error here, before the unpickler would allocate it."""
    for op, arg, _ in pickletools.genops(data):
        if op.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"opcode {op.name}")
        if op.name in ("BINPUT", "LONG_BINPUT", "PUT") and not 0 <= int(arg) < len(data):
            raise pickle.UnpicklingError(f"memo index {arg}")  # the memo would grow to it


def _materialize(obj, path, depth=0):
    """Replace the _Tensor stand-ins by arrays, through plain containers (rebuilt as plain
    dict, list and tuple: nothing the pickle set on them survives)."""
    if depth > 100:
        raise PthError(f"{path}: data nested deeper than 100 levels")
    if isinstance(obj, _Tensor):
        return obj.numpy()
    if isinstance(obj, _NamespaceStandIn):  # timm's args: inert data
        return types.SimpleNamespace(**_materialize(getattr(obj, "fields", {}), path, depth + 1))
    if isinstance(obj, dict):
        return {k: _materialize(v, path, depth + 1) for k, v in dict.items(obj)}
    if isinstance(obj, list):
        return [_materialize(v, path, depth + 1) for v in list.__iter__(obj)]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, path, depth + 1) for v in tuple.__iter__(obj))
    return obj
