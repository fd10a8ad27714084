"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

The array decides. Layer code calls `get_xp(x)` and gets the module that owns `x`
(numpy or cupy), so the same functions run on either. There is no global switch.

This is the only module that imports cupy, and it does so lazily: a machine
without CuPy (or without a GPU) never touches it unless the 'cupy' backend is
asked for, and then gets a `BackendError` that says what is missing.
"""
import numpy as np

BACKENDS = ("numpy", "cupy")

# The cupy module, once imported. A test may put a stand-in here (tests/support/fake_cupy.py:
# NumPy-backed, strict about host transfers) to drive the CuPy code paths without a GPU.
_cupy = None


def _import_cupy():
    global _cupy
    if _cupy is None:
        import cupy
        _cupy = cupy
    return _cupy


class BackendError(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no usable GPU)."""


def _is_cupy_array(a):
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return True
    return type(a).__module__.split(".")[0] == "cupy"


def get_xp(*arrays):
    """The array module (numpy or cupy) that owns `arrays`; mixing the two is an error."""
    on_gpu = [_is_cupy_array(a) for a in arrays if a is not None]
    if any(on_gpu):
        if not all(on_gpu):
            raise TypeError("arrays are on different backends (some numpy, some cupy); "
                            "move them together with minimixer.to_backend(obj, backend)")
        return _import_cupy()  # already imported by whoever made the array
    return np


def cupy_module():
    """Import cupy, checking that a CUDA GPU is usable; raise BackendError otherwise."""
    try:
        cupy = _import_cupy()
    except ImportError as e:
        raise BackendError("backend 'cupy' needs CuPy: pip install 'minimixer[cuda12]' "
                           "(or [cuda13] for CUDA 13)") from e
    try:
        usable = cupy.is_available()  # False, or a CUDA error, on a machine without a GPU
    except Exception:  # noqa: BLE001 - any driver/runtime failure means "not usable"
        usable = False
    if not usable:
        raise BackendError("backend 'cupy' needs a usable CUDA GPU, and CuPy found none")
    return cupy


def cupy_available():
    """True when the 'cupy' backend can run here."""
    try:
        cupy_module()
    except BackendError:
        return False
    return True


def xp_for(backend):
    """The array module for a backend name: 'numpy' or 'cupy'."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        return cupy_module()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def to_backend(obj, backend, dtype=None):
    """Move an array, or a dict of arrays, to `backend` ('numpy' or 'cupy'), optionally casting.

    One call each way: `to_backend(params, "cupy")` puts params on the GPU,
    `to_backend(logits, "numpy")` brings results back.
    """
    if isinstance(obj, dict):
        return {k: to_backend(v, backend, dtype) for k, v in obj.items()}
    xp = xp_for(backend)
    if xp is np and _is_cupy_array(obj):
        obj = obj.get()
    out = xp.asarray(obj)
    return out if dtype is None else out.astype(dtype, copy=False)


def to_numpy(obj):
    """Bring an array, or a dict of arrays, back to NumPy (a no-op for NumPy input)."""
    return to_backend(obj, "numpy")


FLOAT_DTYPES = ("float16", "float32", "float64")


def float_dtype(dtype):
    """np.dtype for a float dtype name or object; anything else is a ValueError."""
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {FLOAT_DTYPES}")
    return dt
