"""Reading and writing timm's safetensors weight files.

Loading is strict, like PyTorch's load_state_dict(strict=True): every missing,
unexpected and misshapen tensor is named in one error, and no partially loaded
dict is ever returned, and a tensor holding NaN or Inf is refused by name. Saving
writes a temporary file and renames it, so a crash never leaves a half-written
checkpoint behind; the temporary files a killed writer left are removed by the next
write to the same file.
"""
import errno
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import safetensors
import safetensors.numpy

from ..backend import to_numpy

# safetensors dtype tags we can turn into floats. bf16 has no NumPy dtype: it is
# the top half of a float32, so we widen its bits by a 16-bit shift.
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
TMP_PREFIX = ".tmp-"  # temporary files are .tmp-<pid>-<8 random chars><target name>
_STARTED = time.time()  # temp files older than this process are no writer's of ours


def open_regular_file(path):
    """open(path, 'rb'), but only for a regular file: /dev/zero would be read without end
    and a FIFO would block forever. Raises OSError (missing, unreadable, a directory) as
    open() does, or ValueError (a FIFO, a device, a socket), which the caller prefixes."""
    path = os.fspath(path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer before we can look at it
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise ValueError("not a regular file (only regular files are read)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_safetensors(path):
    """Every tensor in a safetensors file as a NumPy array (bf16 widened to float32).

    Raises OSError for a missing/unreadable path and ValueError, naming the path,
    for an empty, truncated or non-safetensors file, or one that is not a regular file.
    """
    path = os.fspath(path)
    try:
        f = open_regular_file(path)  # OSError (FileNotFoundError, PermissionError, ...) as is
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    with f:
        data = f.read()
    try:
        entries = safetensors.deserialize(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    tensors = {}
    for name, entry in entries:
        tag, shape, raw = entry["dtype"], entry["shape"], entry["data"]
        if tag == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif tag in _NUMPY_DTYPES:
            array = np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[tag]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tag}, expected a float "
                             f"({', '.join([*_NUMPY_DTYPES, 'BF16'])})")
        tensors[name] = array.reshape(shape)
    return tensors


def _some(names, sep=", ", first=5):
    """The first few names and how many more: a 54-key list would bury the message."""
    names = list(names)
    more = f"{sep}... ({len(names) - first} more)" if len(names) > first else ""
    return sep.join(names[:first]) + more


def check_state_dict(shapes, expected, source):
    """Raise one ValueError naming the missing, unexpected and misshapen tensors (the first
    few of each, and their counts)."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshapen = [f"{k}: file {tuple(shapes[k])} vs model {tuple(expected[k])}"
                 for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_some(unexpected)}")
    if misshapen:
        problems.append(f"misshapen {len(misshapen)}: {_some(misshapen, '; ')}")
    if problems:
        raise ValueError(f"{source} does not fit this model config: " + " | ".join(problems))


def check_finite(params, source):
    """Raise a ValueError naming the first tensor (in timm's order) that holds NaN or Inf:
    such weights give NaN logits, which would pass for a low accuracy."""
    for name, v in params.items():
        bad = v.size - int(np.count_nonzero(np.isfinite(v)))
        if bad:
            raise ValueError(f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN or Inf) "
                             f"of {v.size}; load it anyway with allow_nonfinite=True (--allow-nonfinite)")


def save_weights(params, path, metadata=None):
    """Write params as safetensors that timm's load_state_dict(strict=True) accepts; atomic.
    metadata: more string entries for the header (convert.trained_metadata)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in to_numpy(params).items()}
    atomic_write_bytes(path, safetensors.numpy.save(arrays, metadata={"format": "pt", **(metadata or {})}))


@contextmanager
def atomic_target(path):
    """Yield a temporary path in path's folder; on success it is renamed onto path, on any
    failure it is removed, so readers see the old file or the whole new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_orphans(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=os.path.basename(path))
    except OSError as e:  # name the file the user asked for, not our temporary one
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and path not in str(e):  # out of space, quota: name the file, not our temp
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def remove_orphans(path):
    """Delete the temporary files that a killed writer of `path` left in its folder: only
    names of our own pattern for this very file (.tmp-<pid>-XXXXXXXX<name>), and only those
    whose writer no longer runs, so a concurrent writer's file is left alone. (Names without
    a pid, from older versions, go by age: older than this process.) Returns the names removed, sorted."""
    folder = os.path.dirname(os.path.abspath(path))
    name = re.escape(os.path.basename(path))
    pattern = re.compile(re.escape(TMP_PREFIX) + r"(?:([0-9]+)-)?[a-z0-9_]{8}" + name + r"\Z")
    try:
        entries = [(e, pattern.match(e.name)) for e in os.scandir(folder)]
    except OSError:
        return []  # an unreadable folder: mkstemp will say what is wrong
    removed = []
    for e, match in entries:
        if match is None or (match.group(1) and _running(int(match.group(1)))):
            continue
        try:
            from_a_dead_writer = match.group(1) or e.stat(follow_symlinks=False).st_mtime < _STARTED
            if e.is_file(follow_symlinks=False) and from_a_dead_writer:
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            pass  # gone already, or not ours to remove
    return sorted(removed)


def _running(pid):
    """Whether process `pid` exists (here; a shared folder's other hosts cannot be asked)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows, os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but is not ours, or cannot tell: keep its file
    return True


def check_writable(path):
    """Raise OSError now if `path` cannot be written later (its folder is missing or read-only,
    or it is a folder): a check before a long run, not a guarantee."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: no such directory {folder}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=os.path.basename(path))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def atomic_write_bytes(path, data):
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(src, dst):
    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

