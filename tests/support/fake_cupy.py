"""fake_cupy: a NumPy-backed STAND-IN for CuPy, for tests on machines without a GPU.

It is not CuPy and no substitute for a GPU run: it runs no CUDA, its kernels are NumPy
emulations, and its timings mean nothing. What it does check is the host/device discipline
of minimixer's CuPy path, strictly, as real CuPy would enforce it (or stricter):

- its arrays refuse implicit conversion to NumPy: np.asarray(a), NumPy ufuncs and functions
  on them, and operators or kernels that mix them with NumPy arrays all raise TypeError;
- every device-to-host transfer (get, tolist, item, float(), int(), bool(), asnumpy), each a
  synchronization on a GPU, is counted in `stats.d2h`, host-to-device copies in `stats.h2d`,
  Device().synchronize() calls in `stats.syncs`;
- ElementwiseKernel is emulated with NumPy by kernel name (minimixer.fast.CUPY_KERNELS), after
  the same argument checks CuPy makes (one dtype per type letter, outputs of the broadcast
  shape), computing in float for float16/float32 arrays and in double for float64, as the CUDA
  kernels do; launches are counted per name in `stats.launches`;
- a memory pool counts the bytes that live arrays hold; every allocation goes through the
  function given to cuda.set_allocator (pool.malloc by default), as in CuPy;
- cupy._core's compute type for matmuls (TF32 or not) is kept, and CUPY_TF32 is read lazily,
  on the first query, as CuPy does.

Tests install it with `install(monkeypatch)`, which puts it into minimixer.backend's lazy
import slot (backend._cupy); `import cupy` is never involved.
"""
import builtins
import collections
import contextlib
import math
import operator
import os
import types
import weakref

import numpy as _np

__version__ = "0+fake (NumPy stand-in for CuPy, no GPU)"


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.d2h = 0  # device-to-host transfers: each one waits for the GPU
        self.h2d = 0
        self.syncs = 0
        self.launches = collections.Counter()


stats = Stats()


def install(monkeypatch):
    """Make minimixer's 'cupy' backend this stand-in for the rest of the test; returns the module."""
    import sys

    from minimixer import backend
    monkeypatch.setattr(backend, "_cupy", sys.modules[__name__])
    _linalg.compute_types = [_linalg.COMPUTE_TYPE_TBD] * 3
    stats.reset()
    return sys.modules[__name__]


class HostDeviceMixError(TypeError):
    pass


def _mix_error(what):
    return HostDeviceMixError(f"{what}: a NumPy array mixed with a (fake) CuPy array; "
                              "move it with minimixer.to_backend first")


def _unwrap(x, what="operand"):
    """The NumPy array behind a fake array; NumPy arrays are refused, scalars pass."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        raise _mix_error(what)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, what) for v in x)
    return x


def _wrap(r):
    if isinstance(r, _np.ndarray):
        _memory.track(r)
        return ndarray(r)
    if isinstance(r, _np.generic):  # reductions and scalar indexing give 0-d device arrays in CuPy
        return _wrap(_np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    return r


def _call(fn, args, kwargs):
    out = kwargs.get("out")
    r = fn(*_unwrap(args, fn.__name__), **{k: _unwrap(v, fn.__name__) for k, v in kwargs.items()})
    return out if isinstance(out, ndarray) else _wrap(r)


# --- memory -------------------------------------------------------------------------------------

class MemoryPointer:
    def __init__(self, pool, size):
        self.pool, self.size = pool, size
        pool._used += size
        pool._total = builtins.max(pool._total, pool._used)

    def free(self):
        if self.pool is not None:
            self.pool._used -= self.size
            self.pool = None

    def __del__(self):
        self.free()


class _MemoryPool:
    """Counts the bytes held by live arrays (sizes rounded to 512 bytes, as CuPy's pool does)."""

    def __init__(self):
        self._used = self._total = 0

    def malloc(self, size):
        return MemoryPointer(self, -(-size // 512) * 512)

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return self._total

    def free_all_blocks(self):
        self._total = self._used


class _Memory:
    def __init__(self):
        self.pool = _MemoryPool()
        self.allocator = self.pool.malloc
        self.tracked = {}  # id(root ndarray) -> weakref.finalize holding its MemoryPointer

    def track(self, a):
        root = a
        while isinstance(root.base, _np.ndarray):
            root = root.base
        fin = self.tracked.get(id(root))
        if fin is not None and fin.alive:
            return
        if len(self.tracked) > 4096:
            self.tracked = {k: f for k, f in self.tracked.items() if f.alive}
        self.tracked[id(root)] = weakref.finalize(root, MemoryPointer.free, self.allocator(root.nbytes))


_memory = _Memory()


def get_default_memory_pool():
    return _memory.pool


# --- the array ----------------------------------------------------------------------------------

class ndarray:
    """A 'device' array: a NumPy array that does not convert to NumPy by itself."""
    __array_ufunc__ = None  # NumPy ufuncs and NumPy-array operators refuse it (they return NotImplemented)
    __hash__ = None

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly. (fake_cupy)")

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a (fake) CuPy array: use the cupy function")

    def __repr__(self):
        return f"fake_cupy.ndarray(shape={self.shape}, dtype={self.dtype})"

    # device -> host: each one counted
    def get(self, stream=None, order="C", out=None):
        stats.d2h += 1
        return _np.array(self._a, order=order)

    def tolist(self):
        stats.d2h += 1
        return self._a.tolist()

    def item(self):
        stats.d2h += 1
        return self._a.item()

    def __float__(self):
        stats.d2h += 1
        return float(self._a)

    def __int__(self):
        stats.d2h += 1
        return int(self._a)

    def __index__(self):
        stats.d2h += 1
        return operator.index(self._a)

    def __bool__(self):
        stats.d2h += 1
        return bool(self._a)

    # metadata: no transfer
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "index")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "index")] = _unwrap(value, "assignment")

    def astype(self, dtype, copy=True, **kwargs):
        return _wrap(self._a.astype(dtype, copy=copy, **kwargs))

    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def view(self, *args):
        return _wrap(self._a.view(*args))


def _method(name):
    def method(self, *args, **kwargs):
        return _call(getattr(_np.ndarray, name), (self,) + args, kwargs)
    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "ravel", "flatten", "squeeze", "swapaxes", "sum", "mean", "var", "std",
              "max", "min", "argmax", "argmin", "any", "all", "prod", "cumsum", "clip", "dot", "fill", "round"):
    setattr(ndarray, _name, _method(_name))


def _binary(op, reflected=False):
    def method(self, other):
        if isinstance(other, _np.ndarray):
            raise _mix_error(op.__name__)
        o = _unwrap(other)
        return _wrap(op(o, self._a) if reflected else op(self._a, o))
    return method


def _inplace(op):
    def method(self, other):
        if isinstance(other, _np.ndarray):
            raise _mix_error(op.__name__)
        op(self._a, _unwrap(other))  # NumPy's in-place operators write into self._a
        return self
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    _op = getattr(operator, _name + "_" if _name in ("and", "or") else _name)
    setattr(ndarray, f"__{_name}__", _binary(_op))
    setattr(ndarray, f"__r{_name}__", _binary(_op, reflected=True))
    setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__", (lambda op: lambda self: _wrap(op(self._a)))(getattr(operator, _name)))


# --- the module's functions ---------------------------------------------------------------------

def _function(name):
    fn = getattr(_np, name)

    def function(*args, **kwargs):
        return _call(fn, args, kwargs)
    function.__name__ = name
    return function


for _name in ("add", "subtract", "multiply", "divide", "true_divide", "power", "negative", "sqrt", "exp", "log",
              "log1p", "expm1", "tanh", "abs", "absolute", "sign", "copysign", "maximum", "minimum", "square",
              "reciprocal", "where", "clip", "repeat", "tile", "matmul", "dot", "vdot", "tensordot", "einsum",
              "concatenate", "stack", "hstack", "vstack", "sum", "mean", "max", "min", "amax", "amin", "argmax",
              "argmin", "argsort", "sort", "isfinite", "isnan", "logical_and", "logical_or", "logical_not",
              "equal", "not_equal", "less", "greater", "less_equal", "greater_equal", "transpose", "reshape",
              "expand_dims", "squeeze", "broadcast_to", "moveaxis", "swapaxes", "floor", "ceil", "round",
              "cumsum", "prod", "outer", "zeros_like", "ones_like", "empty_like", "full_like", "ravel",
              "take_along_axis", "allclose", "count_nonzero", "any", "all"):
    globals()[_name] = _function(_name)

for _name in ("zeros", "ones", "empty", "full", "arange", "linspace", "eye", "identity"):
    globals()[_name] = (lambda fn: lambda *a, **k: _wrap(fn(*a, **k)))(getattr(_np, _name))

for _name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_", "complex64",
              "complex128", "dtype", "newaxis", "pi", "e", "inf", "nan", "result_type", "promote_types",
              "can_cast", "finfo", "iinfo"):
    globals()[_name] = getattr(_np, _name)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    stats.h2d += 1
    return _wrap(_np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, ndarray):
        return _wrap(_np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    stats.h2d += 1
    return _wrap(_np.array(a, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    return _wrap(_np.ascontiguousarray(_unwrap(a), dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a, order=order)


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else _np


def is_available():
    return True


# --- fused kernels: NumPy emulations, by name -----------------------------------------------------

def _compute_type(dtype):
    """The type the CUDA kernels compute in: double for float64, float for float16 and float32."""
    return _np.float64 if dtype == _np.float64 else _np.float32


def _erf(v):
    from minimixer.erf import erf  # exact in float64 (CUDA's erf: 2 ulp); float32: A&S 7.1.26, 1.5e-7
    return erf(v)


def _tanh_parts(v):
    from minimixer.layers import GELU_TANH_COEF, SQRT_2_OVER_PI
    return _np.tanh(SQRT_2_OVER_PI * (v + GELU_TANH_COEF * v * v * v)), SQRT_2_OVER_PI, GELU_TANH_COEF


def _bias_gelu(b, x):
    v = x.astype(_compute_type(x.dtype)) + b.astype(_compute_type(x.dtype))
    x[...] = v * (0.5 * (1 + _erf(v * math.sqrt(0.5))))


def _bias_gelu_grad(b, x, d):
    v = x.astype(_compute_type(x.dtype)) + b.astype(_compute_type(x.dtype))
    cdf = 0.5 * (1 + _erf(v * math.sqrt(0.5)))
    d[...] = cdf + v * _np.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
    x[...] = v * cdf


def _bias_gelu_tanh(b, x):
    v = x.astype(_compute_type(x.dtype)) + b.astype(_compute_type(x.dtype))
    t, _, _ = _tanh_parts(v)
    x[...] = 0.5 * v * (1 + t)


def _bias_gelu_tanh_grad(b, x, d):
    v = x.astype(_compute_type(x.dtype)) + b.astype(_compute_type(x.dtype))
    t, c, k = _tanh_parts(v)
    d[...] = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * k * v * v)
    x[...] = 0.5 * v * (1 + t)


KERNEL_EMULATIONS = {
    "minimixer_bias_gelu": _bias_gelu,
    "minimixer_bias_gelu_grad": _bias_gelu_grad,
    "minimixer_bias_gelu_tanh": _bias_gelu_tanh,
    "minimixer_bias_gelu_tanh_grad": _bias_gelu_tanh_grad,
}


def _params(spec):
    return [p.split()[-2:] for p in spec.split(",") if p.strip()]  # [(type, name)]


class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="", **kwargs):
        if name not in KERNEL_EMULATIONS:
            raise NotImplementedError(f"fake_cupy has no NumPy emulation of kernel {name!r}: add one to "
                                      "tests/support/fake_cupy.py KERNEL_EMULATIONS")
        self.in_params, self.out_params = _params(in_params), _params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble

    def __call__(self, *args):
        params = self.in_params + self.out_params
        if len(args) != len(params):
            raise TypeError(f"{self.name}: wrong number of arguments ({len(args)} for {len(params)})")
        outs = args[len(self.in_params):]
        if not builtins.all(isinstance(a, ndarray) for a in args):
            bad = [type(a).__name__ for a in args if not isinstance(a, ndarray)]
            raise TypeError(f"{self.name}: arguments must be cupy arrays, got {bad}")
        types_ = {}
        for (ctype, pname), a in zip(params, args):
            if types_.setdefault(ctype, a.dtype) != a.dtype:
                raise TypeError(f"Type is mismatched. {pname} {a.dtype} {types_[ctype]} {ctype}")
        shape = _np.broadcast_shapes(*[a.shape for a in args])
        if builtins.any(o.shape != shape for o in outs):
            raise ValueError("Out shape is mismatched")
        stats.launches[self.name] += 1
        KERNEL_EMULATIONS[self.name](*[a._a for a in args])
        return outs[0] if len(outs) == 1 else tuple(outs)


# --- cupy.cuda and cupy._core -----------------------------------------------------------------------

class _Device:
    def __init__(self, device=0):
        self.id = device
        self.compute_capability = "90"

    def synchronize(self):
        stats.syncs += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _set_allocator(allocator=None):
    _memory.allocator = allocator or _memory.pool.malloc


cuda = types.SimpleNamespace(
    Device=_Device,
    set_allocator=_set_allocator,
    get_allocator=lambda: _memory.allocator,
    MemoryPool=_MemoryPool,
    runtime=types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"fake_cupy (NumPy stand-in, no GPU)", "major": 9, "minor": 0,
                                       "totalGlobalMem": 80 << 30},
        getDeviceCount=lambda: 1,
        memGetInfo=lambda: (80 << 30, 80 << 30)),
)


class _RoutinesLinalg:
    """cupy._core._routines_linalg's compute types: CUPY_TF32 is read on the first query, not at import."""
    COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC = 0, 1, 2
    COMPUTE_TYPE_FP16, COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64, COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32 = 3, 4, 5, 6, 7

    def __init__(self):
        self.compute_types = [self.COMPUTE_TYPE_TBD] * 3

    @staticmethod
    def to_compute_type_index(dtype):
        return {"e": 0, "f": 1, "F": 1, "d": 2, "D": 2}[_np.dtype(dtype).char]

    def get_compute_type(self, dtype):
        i = self.to_compute_type_index(dtype)
        if self.compute_types[i] == self.COMPUTE_TYPE_TBD:
            tf32 = _np.dtype(dtype).char in "fF" and int(os.getenv("CUPY_TF32", "0")) > 0
            self.set_compute_type(dtype, self.COMPUTE_TYPE_TF32 if tf32 else self.COMPUTE_TYPE_DEFAULT)
        return self.compute_types[i]

    def set_compute_type(self, dtype, compute_type):
        self.compute_types[self.to_compute_type_index(dtype)] = compute_type


_linalg = _RoutinesLinalg()
_core = types.SimpleNamespace(_routines_linalg=_linalg, get_compute_type=_linalg.get_compute_type,
                              set_compute_type=_linalg.set_compute_type)


@contextlib.contextmanager
def counting():
    """Yields stats reset to zero at entry."""
    stats.reset()
    yield stats
