"""Reading and writing timm's safetensors weight files.

Loading is strict, like PyTorch's load_state_dict(strict=True): every missing,
unexpected and misshapen tensor is named in one error, and no partially loaded
dict is ever returned. Saving writes a temporary file and renames it, so a
crash never leaves a half-written checkpoint behind.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
import safetensors
import safetensors.numpy

from ..backend import float_dtype, to_backend, to_numpy
from ..config import param_shapes

# safetensors dtype tags we can turn into floats. bf16 has no NumPy dtype: it is
# the top half of a float32, so we widen its bits by a 16-bit shift.
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def read_safetensors(path):
    """Every tensor in a safetensors file as a NumPy array (bf16 widened to float32).

    Raises OSError for a missing/unreadable path and ValueError, naming the path,
    for an empty, truncated or non-safetensors file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:  # OSError (FileNotFoundError, IsADirectoryError, ...) as is
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


def check_state_dict(shapes, expected, source):
    """Raise one ValueError naming every missing, unexpected and misshapen tensor."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshapen = [f"{k}: file {tuple(shapes[k])} vs model {tuple(expected[k])}"
                 for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if misshapen:
        problems.append(f"misshapen {len(misshapen)}: {'; '.join(misshapen)}")
    if problems:
        raise ValueError(f"{source} does not fit this model config: " + " | ".join(problems))


def load_weights(path, cfg, *, dtype="float32", backend="numpy"):
    """Load a timm Mixer checkpoint into a flat dict keyed by timm's names, checked against cfg.
    MMPretrain .pth and JAX .npz files load too (checkpoints/convert.py maps their keys)."""
    from .convert import read_for  # lazy: convert.py imports this module
    dtype = float_dtype(dtype)
    tensors = read_for(path, cfg)
    expected = param_shapes(cfg)
    check_state_dict({k: v.shape for k, v in tensors.items()}, expected, os.fspath(path))
    # astype copies, so every array is writable and owns its memory (not the file buffer)
    params = {k: tensors[k].astype(dtype) for k in expected}
    return to_backend(params, backend)


def save_weights(params, path):
    """Write params as safetensors that timm's load_state_dict(strict=True) accepts; atomic."""
    arrays = {k: np.ascontiguousarray(v) for k, v in to_numpy(params).items()}
    atomic_write_bytes(path, safetensors.numpy.save(arrays, metadata={"format": "pt"}))


@contextmanager
def atomic_target(path):
    """Yield a temporary path in path's folder; on success it is renamed onto path, on any
    failure it is removed, so readers see the old file or the whole new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

