"""Messages between the grader and the child process that runs a student's code.

A message is a tree of tuples, lists, dicts with string keys, strings, numbers, None and
NumPy arrays. It travels as JSON plus raw array bytes: never pickle, so nothing a
submission sends can run code in the grader, and only plain numeric dtypes are accepted.

    frame   = 8-byte length, then a payload
    payload = 4-byte JSON length, the JSON (arrays as {"@a": i}), then each array's bytes
"""
import json
import math
import os
import select
import struct
import time

import numpy as np

MAX_MESSAGE = 64 << 20  # bytes: far above any case's data, far below the grader's memory
_DTYPE_KINDS = "biuf"  # bool, ints, floats


class ProtocolError(Exception):
    """A malformed message (for example a submission that wrote into the grader's pipe)."""


class Deadline(Exception):
    """The other side did not answer in time."""


def encode(tree):
    arrays = []

    def enc(obj):
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
            return {"@i": str(int(obj))}
        if isinstance(obj, (float, np.floating)):
            return {"@f": repr(float(obj))}
        if isinstance(obj, tuple):
            return {"@t": [enc(v) for v in obj]}
        if isinstance(obj, list):
            return {"@l": [enc(v) for v in obj]}
        if isinstance(obj, dict):
            return {"@d": [[str(k), enc(v)] for k, v in obj.items()]}
        if type(obj).__module__.split(".")[0] == "cupy":
            obj = obj.get()
        if isinstance(obj, (np.ndarray, np.bool_)):
            a = np.asarray(obj)
            if a.dtype.kind not in _DTYPE_KINDS:
                return {"@o": f"an array of dtype {a.dtype}"}
            arrays.append(np.ascontiguousarray(a))
            return {"@a": len(arrays) - 1, "dtype": a.dtype.str, "shape": list(a.shape)}
        return {"@o": f"a {type(obj).__name__}"}  # reported by name, never sent

    head = json.dumps(enc(tree)).encode()
    return b"".join([struct.pack("<I", len(head)), head] + [a.tobytes() for a in arrays])


def nbytes(tree, _depth=0):
    """About how many bytes encode(tree) takes (its arrays), without encoding it."""
    if _depth > 50:
        raise ValueError("the result is nested too deeply")
    if isinstance(tree, (tuple, list)):
        return sum(nbytes(v, _depth + 1) for v in tree)
    if isinstance(tree, dict):
        return sum(nbytes(v, _depth + 1) for v in tree.values())
    return int(getattr(tree, "nbytes", 0) or 0)


def decode(payload):
    """The tree in a payload; ProtocolError for anything that encode() would not have written."""
    try:
        return _decode(payload)
    except ProtocolError:
        raise
    except (struct.error, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError,
            MemoryError) as e:
        raise ProtocolError(f"unreadable message: {type(e).__name__}: {e}"[:200]) from None


def _decode(payload):
    (n,) = struct.unpack_from("<I", payload)
    head = json.loads(payload[4:4 + n].decode())
    offset = [4 + n]

    def dec(obj):
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if not isinstance(obj, dict) or len(obj) not in (1, 3):
            raise ProtocolError("unexpected value in a message")
        if "@i" in obj:
            return int(obj["@i"])
        if "@f" in obj:
            return float(obj["@f"])
        if "@t" in obj:
            return tuple(dec(v) for v in obj["@t"])
        if "@l" in obj:
            return [dec(v) for v in obj["@l"]]
        if "@d" in obj:
            return {str(k): dec(v) for k, v in obj["@d"]}
        if "@o" in obj:
            return Opaque(str(obj["@o"]))
        if "@a" in obj:
            dtype = np.dtype(str(obj["dtype"]))
            shape = tuple(int(s) for s in obj["shape"])
            if len(shape) > 32:
                raise ProtocolError("too many dimensions")
            if dtype.kind not in _DTYPE_KINDS or any(s < 0 for s in shape):
                raise ProtocolError(f"refused array dtype {dtype}")
            size = math.prod(shape) * dtype.itemsize
            start = offset[0]
            if start + size > len(payload):
                raise ProtocolError("truncated array data")
            offset[0] += size
            return np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape).copy()
        raise ProtocolError("unexpected value in a message")

    return dec(head)


class Opaque:
    """Something the child could not send (an object of a class of the student's own)."""

    def __init__(self, what):
        self.what = what

    def __repr__(self):
        return self.what


# --- framing over pipes (the child: blocking; the grader: with a deadline) --------------------

def send(fd, tree, deadline=None):
    payload = encode(tree)
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(payload)} bytes is over the {MAX_MESSAGE}-byte limit")
    data = memoryview(struct.pack("<Q", len(payload)) + payload)
    while data:
        if deadline is not None:
            _wait(fd, deadline, write=True)
        data = data[os.write(fd, data):]


def receive(fd, deadline=None):
    (size,) = struct.unpack("<Q", _read(fd, 8, deadline))
    if size > MAX_MESSAGE:
        raise ProtocolError(f"message of {size} bytes is over the {MAX_MESSAGE}-byte limit")
    return decode(_read(fd, size, deadline))


def _wait(fd, deadline, write=False):
    left = deadline - time.monotonic()
    if left <= 0:
        raise Deadline()
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], left)
    if not (r or w):
        raise Deadline()


def _read(fd, n, deadline):
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            _wait(fd, deadline)
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
