"""The fast path: the same Mixer as model.py, reorganized for speed. tests/test_fast.py
proves that it computes what the clear path computes.

`mm.predict` and the trainer run this module. Read model.py and layers.py to
learn the math; read this to see where the time goes on a CPU, and why.

- Matmuls are almost all the FLOPs, and NumPy's BLAS runs them as fast as PyTorch's.
  A naive NumPy Mixer still runs at half timm's speed, because its elementwise work
  (GELU, LayerNorm, bias and residual adds) is single-threaded and streams hidden
  activations of tens of MB through memory about twenty times.
- So the batch is split into one share per core, each with single-threaded BLAS
  (run_shares): the GEMMs keep their speed and all the elementwise work runs in parallel
  (NumPy ufuncs release the GIL). With fewer images than cores (one image on two), BLAS's
  own threads split each matmul instead, and the elementwise work stays in the calling
  thread: on an idle machine that beats a split by hand (see bench's GEMM ceiling), though
  BLAS's threads slow down sharply when other processes compete for the cores.
- Elementwise work runs in place, in chunks of about L2 size, and GELU reuses its one
  exp: gelu(x) = relu(x) - |x|·q and gelu'(x) = Φ(x) + x·φ(x), with q = Φ(-|x|).
- Even so, NumPy makes one pass over memory per operation: about 17 for GELU. With the `fast`
  extra (Numba) installed, GELU, LayerNorm, the residual adds and AdamW run as fused one-loop
  kernels instead (kernels_numba.py): GELU drops from about 2.6 to 0.5 ns per element, which
  took a share of 8 B/16 images from 0.78 to 0.89 of the GEMM ceiling, and the S/32 training
  step to 0.97-1.00x torch eager (both with glibc keeping freed blocks, see allocator.py).
  Without Numba, the NumPy kernels below run.
- No float32 GELU output is a denormal (see erf.TAIL_EXP_FLOOR): on x86 each denormal operand
  costs the next matmul a microcode assist.
- Token mixing is a left multiplication, W1 @ y per image, so nothing is transposed.
- Inference runs the channel MLP over a thousand or so tokens at a time, so its (·, DC)
  hidden stays in L3 and the peak memory stays small.
- Training keeps only what backward needs: each LayerNorm's normalized input and its
  rstd (its output, fc1's input, is rebuilt as n·w + b), and for each GELU its output
  and its derivative (the pre-activation itself is never needed again). Backward frees
  each block's cache as soon as it is done with it.

On CuPy arrays the same functions run with cupy's ops, and GELU is one fused kernel.

Shape legend: B batch, N tokens, D channels, DS/DC token/channel hidden, M = B·N rows, K classes.
"""
import importlib.util
import math
import sys
import threading

import numpy as np

from .. import erf as erf_module
from .. import layers, optim
from ..runtime import threads
from ..backend import get_xp
from ..erf import erf
from ..layers import patchify, unpatchify
from ..model import check_input
from ..runtime.threads import num_threads

# --- elementwise kernels: NumPy, chunked and threaded ----------------------------------------

CHUNK_ELEMENTS = 1 << 16  # 256 KB of float32 per array: a chunk and its scratch fit in L2; smaller
# chunks mean more ufunc calls, and each one hands the GIL between the shares' threads
_scratch = threads.local  # per-thread scratch buffers and the `serial` flag


def scratch(i, shape, dtype):
    """Per-thread scratch buffers, reused across calls (fresh allocations page-fault)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (i, dtype)
    size = math.prod(shape)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(max(size, CHUNK_ELEMENTS), dtype)
    return buf[:size].reshape(shape)


def run_rows(kernel, *arrays, chunk=CHUNK_ELEMENTS):
    """Call kernel(*slices) over row chunks of about `chunk` elements (None: no chunks, one call
    per thread, for a one-pass kernel). Each thread takes one contiguous share of the rows and
    walks it chunk by chunk (the calling thread takes the first share), so there is one hand-off
    per thread, not per chunk. 2-d arrays (all with the same number of rows) are sliced by rows;
    1-d arrays (a bias along columns) and None are passed whole."""
    rows = arrays[0].shape[0]
    width = max(1, math.prod(arrays[0].shape[1:]))
    step = rows if chunk is None else max(1, chunk // width)

    def walk(start, stop):
        for r in range(start, stop, step):
            e = min(r + step, stop)
            kernel(*[a[r:e] if a is not None and a.ndim >= 2 else a for a in arrays])

    if getattr(_scratch, "serial", False) or rows == 0:
        shares = 1
    elif chunk is None:  # one share per thread, but not for a few rows: a hand-off costs ~20 µs
        shares = min(num_threads(), max(1, rows * width // CHUNK_ELEMENTS))
    else:
        shares = min(num_threads(), -(-rows // step))
    if shares <= 1:
        walk(0, rows)
        return
    bounds = [rows * k // shares for k in range(shares + 1)]
    futures = [threads.executor().submit(walk, bounds[k], bounds[k + 1]) for k in range(1, shares)]
    walk(bounds[0], bounds[1])
    for f in futures:
        f.result()


# --- Numba's fused kernels, where installed (the `fast` extra) ---------------------------------------

USE_NUMBA = True  # tests turn it off to check the NumPy kernels on a machine that has Numba
_numba_module = []  # [the module or None], once imported
_numba_lock = threading.Lock()


def numba_kernels(x):
    """minimixer.fast.kernels_numba if it can run on x (Numba installed, float32/float64 NumPy array), else None."""
    if not USE_NUMBA or get_xp(x) is not np or x.dtype not in (np.float32, np.float64):
        return None
    if not _numba_module:
        with _numba_lock:  # the shares' threads get here together on the first call: import once
            if not _numba_module:
                _numba_module.append(_import_numba_kernels())
    return _numba_module[0]


def _import_numba_kernels():
    if importlib.util.find_spec("numba") is None:  # not installed: the NumPy kernels below, silently
        return None
    try:
        from . import kernels_numba
        return kernels_numba
    except ImportError as e:  # e.g. a Numba built for another NumPy
        print(f"minimixer: Numba is installed but cannot run ({e}); using the NumPy kernels", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (e.g. no writable folder for Numba's cache)
        print(f"minimixer: Numba's kernels did not compile ({type(e).__name__}: {e}); using the NumPy kernels",
              file=sys.stderr)
    return None


def _run_bias_gelu(nk, x, bias, d=None):
    """x <- gelu(x + bias) (and d <- gelu'(x + bias)) through Numba; bias (cols,), (rows, 1) or None."""
    if bias is None:
        bias = np.zeros(x.shape[1], x.dtype)
    bias = np.asarray(bias, x.dtype)
    per_row = bias.ndim == 2  # (rows, 1): sliced with x's rows
    if d is None:
        kernel = nk.BIAS_GELU[x.dtype]
        run_rows(lambda xs, bs: kernel(xs, bs[:, 0] if per_row else bs, per_row), x, bias, chunk=None)
    else:
        kernel = nk.BIAS_GELU_GRAD[x.dtype]
        run_rows(lambda xs, bs, ds: kernel(xs, bs[:, 0] if per_row else bs, per_row, ds), x, bias, d, chunk=None)


def load_kernels(dtype=np.float32):
    """Compile Numba's kernels for dtype now (or load them from Numba's cache), so that the first
    forward pass does not pay for it: about 1.5 s the first time, 0.5 s from the cache, and Numba
    and LLVM stay resident (about 130 MB). A no-op without Numba."""
    x = np.ones((2, 3), dtype)
    if numba_kernels(x) is None:
        return
    b, d = np.ones(3, dtype), np.empty_like(x)
    bias_gelu_(x, b)
    bias_gelu_(x, b[:2, None])
    bias_gelu_grad_(x, b, d)
    bias_gelu_grad_(x, b[:2, None], d)
    norm, rstd = np.empty_like(x), np.empty((2, 1), dtype)
    layernorm_(x, d, b, b)
    layernorm_(x, d, b, b, norm=norm, rstd=rstd)
    layernorm_backward_add_(x, norm, rstd, b, d)
    multiply_and_sum_(d, x, 0)
    add_bias_residual_(d, x, b)
    add_bias_residual_(d, x, b[:2, None])
    multiply_and_sum_(d.reshape(1, 2, 3), x.reshape(1, 2, 3), (0, 2))
    AdamW({"w": b.copy()}).step({"w": b})


# Abramowitz & Stegun 7.1.26 for q = Φ(-|x|) = 0.5·erfc(|x|/√2) = P(t)·exp(-x²/2),
# t = 1/(1 + p|x|/√2); coefficients pre-multiplied by 0.5 (|error| ≤ 0.75e-7)
AS_P = erf_module.AS_P / math.sqrt(2.0)
AS_INV_P = 1.0 / AS_P
AS_A = tuple(0.5 * a for a in erf_module.AS_A)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _phi_tail(x, a, t, q):
    """a = |x|, q = Φ(-|x|), t = exp(-x²/2) (all in the given buffers)."""
    np.abs(x, out=a)
    np.add(a, AS_INV_P, out=t)
    np.divide(AS_INV_P, t, out=t)  # 1/(1 + p·a) in two passes
    np.multiply(t, AS_A[4], out=q)
    for coef in AS_A[3::-1]:
        q += coef
        q *= t
    np.multiply(x, x, out=t)
    t *= -0.5
    np.maximum(t, erf_module.TAIL_EXP_FLOOR, out=t)  # no denormal activations (see erf.py)
    np.exp(t, out=t)
    q *= t


def _zeros(shape, dtype):
    z = scratch(3, shape, dtype)
    if getattr(_scratch, "zeroed", None) is not z.base:  # fill once per buffer
        z.base[...] = 0
        _scratch.zeroed = z.base
    return z


def _gelu_rows(x, bias):
    """x <- gelu(x + bias) in place, on a chunk of rows."""
    if bias is not None:
        x += bias
    if x.dtype == np.float64:  # float64 is for checking: keep the exact erf
        x[...] = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
        return
    a, t, q = (scratch(i, x.shape, x.dtype) for i in range(3))
    _phi_tail(x, a, t, q)
    q *= a
    np.maximum(x, _zeros(x.shape, x.dtype), out=x)  # an array operand: a scalar 0 is 4x slower
    x -= q  # relu(x) - |x|·Φ(-|x|) = x·Φ(x) for either sign of x


def _gelu_grad_rows(x, bias, d):
    """x <- gelu(x + bias) and d <- gelu'(x + bias), in place, on a chunk of rows."""
    if bias is not None:
        x += bias
    if x.dtype == np.float64:  # float64 is for checking: keep the exact erf
        cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
        d[...] = cdf + x * np.exp(-0.5 * x * x) * INV_SQRT_2PI
        x *= cdf
        return
    a, t, q = (scratch(i, x.shape, x.dtype) for i in range(3))
    _phi_tail(x, a, t, q)
    t *= x
    t *= INV_SQRT_2PI  # x·φ(x)
    np.subtract(0.5, q, out=d)
    np.copysign(d, x, out=d)
    d += 0.5  # Φ(x): 1 - q for x ≥ 0, q for x < 0
    x *= d  # gelu = x·Φ(x)
    d += t  # gelu' = Φ(x) + x·φ(x)


def _gelu_tanh_rows(x, bias):
    """x <- tanh-approximate gelu(x + bias), in place (cfg.gelu == 'tanh')."""
    if bias is not None:
        x += bias
    x[...] = layers.gelu_forward(x, "tanh")[0]


def _gelu_tanh_grad_rows(x, bias, d):
    if bias is not None:
        x += bias
    out, cache = layers.gelu_forward(x, "tanh")
    d[...] = layers.gelu_backward(np.ones_like(x), cache)
    x[...] = out


# Fused CUDA kernels for CuPy: (in params, out params, body) by name; tests/test_nvrtc.py compiles
# each for float16/32/64. C is the type they compute in: float for float16 and float32 arrays (CUDA's
# erff is within 2 ulp), double for float64 (erf, exp, tanh in double), as the NumPy path computes.
CUPY_PREAMBLE = """
template <typename T> struct minimixer_compute { typedef float type; };
template <> struct minimixer_compute<double> { typedef double type; };
"""
_V = "typedef minimixer_compute<T>::type C; C v = (C)x + (C)b;"
_ERF_CDF = f"C cdf = C(0.5) * (C(1) + erf(v * C({math.sqrt(0.5)!r})));"
_TANH = (f"C t = tanh(C({layers.SQRT_2_OVER_PI!r}) * (v + C({layers.GELU_TANH_COEF!r}) * v * v * v));")
CUPY_KERNELS = {
    "minimixer_bias_gelu": ("T b", "T x", f"{_V} {_ERF_CDF} x = (T)(v * cdf);"),
    "minimixer_bias_gelu_grad": (
        "T b", "T x, T d",
        f"{_V} {_ERF_CDF} d = (T)(cdf + v * exp(C(-0.5) * v * v) * C({INV_SQRT_2PI!r})); x = (T)(v * cdf);"),
    "minimixer_bias_gelu_tanh": ("T b", "T x", f"{_V} {_TANH} x = (T)(C(0.5) * v * (C(1) + t));"),
    "minimixer_bias_gelu_tanh_grad": (
        "T b", "T x, T d",
        f"{_V} {_TANH} d = (T)(C(0.5) * (C(1) + t) + C(0.5) * v * (C(1) - t * t) * C({layers.SQRT_2_OVER_PI!r})"
        f" * (C(1) + C({3 * layers.GELU_TANH_COEF!r}) * v * v)); x = (T)(C(0.5) * v * (C(1) + t));"),
}
_GELU_KERNEL = {("erf", False): "minimixer_bias_gelu", ("erf", True): "minimixer_bias_gelu_grad",
                ("tanh", False): "minimixer_bias_gelu_tanh", ("tanh", True): "minimixer_bias_gelu_tanh_grad"}


def _cupy_kernel(cp, name):
    """CUPY_KERNELS[name] as a cp.ElementwiseKernel, built once per process (CuPy compiles it on first use)."""
    cache = _cupy_kernel.__dict__.setdefault("cache", {})
    if (cp, name) not in cache:
        cache[cp, name] = cp.ElementwiseKernel(*CUPY_KERNELS[name], name, preamble=CUPY_PREAMBLE)
    return cache[cp, name]


def bias_gelu_(x, bias=None, form="erf"):
    """x <- gelu(x + bias), in place; x is 2-d (rows, cols), bias is (cols,) or (rows, 1)
    (on CuPy, any shapes that broadcast: one kernel launch)."""
    xp = get_xp(x)
    nk = numba_kernels(x) if form == "erf" else None
    if nk is not None:
        _run_bias_gelu(nk, x, bias)
    elif xp is np:
        run_rows(_gelu_rows if form == "erf" else _gelu_tanh_rows, x, bias)
    else:
        _cupy_kernel(xp, _GELU_KERNEL[form, False])(xp.zeros((), x.dtype) if bias is None else bias, x)
    return x


def bias_gelu_grad_(x, bias, d, form="erf"):
    """x <- gelu(x + bias), d <- gelu'(x + bias), in place."""
    xp = get_xp(x)
    nk = numba_kernels(x) if form == "erf" else None
    if nk is not None:
        _run_bias_gelu(nk, x, bias, d)
    elif xp is np:
        run_rows(_gelu_grad_rows if form == "erf" else _gelu_tanh_grad_rows, x, bias, d)
    else:
        _cupy_kernel(xp, _GELU_KERNEL[form, True])(xp.zeros((), x.dtype) if bias is None else bias, x, d)
    return x, d


def add_bias_residual_(h, out, bias):
    """h += out + bias in place; bias (cols,) or (rows, 1) for 2-d h (on CuPy, any shapes that broadcast)."""
    nk = numba_kernels(h)
    if nk is not None and h.ndim == 2 and out.dtype == h.dtype and bias.dtype == h.dtype:
        per_row = bias.ndim == 2
        run_rows(lambda hs, os_, bs: nk.add_bias_residual(hs, os_, bs[:, 0] if per_row else bs, per_row),
                 h, out, bias, chunk=None)
        return h
    h += out
    h += bias
    return h


def _layernorm_rows(x, out, w, b, norm, rstd_out, eps):
    acc = np.promote_types(x.dtype, np.float32)  # float16: statistics in float32, its squares overflow
    mean = x.mean(axis=1, keepdims=True, dtype=acc)
    np.subtract(x, mean, out=out)
    var = np.einsum("ij,ij->i", out, out, dtype=acc)[:, None] / x.shape[1]
    rstd = 1.0 / np.sqrt(var + eps)
    out *= rstd
    if norm is not None:
        norm[...] = out
    if rstd_out is not None:
        rstd_out[...] = rstd
    if w is not None:
        out *= w
        out += b


def layernorm_(x, out, w=None, b=None, eps=1e-6, norm=None, rstd=None):
    """out <- LayerNorm(x)·w + b over the last axis of 2-d x (no affine when w is None);
    optionally also the normalized x (norm) and rstd (rows, 1) for backward."""
    xp = get_xp(x)
    nk = numba_kernels(x) if w is not None else None
    if nk is not None:
        eps = x.dtype.type(eps)
        run_rows(lambda xs, os_, ns, rs: nk.layernorm(xs, os_, w, b, eps, ns, rs), x, out, norm, rstd, chunk=None)
        return out
    if xp is np:
        run_rows(lambda xs, os_, ns, rs: _layernorm_rows(xs, os_, w, b, ns, rs, eps), x, out, norm, rstd)
        return out
    acc = xp.promote_types(x.dtype, xp.float32)  # float16: statistics in float32, its squares overflow
    mean = x.mean(axis=1, keepdims=True, dtype=acc)
    xp.subtract(x, mean, out=out)
    xc = out.astype(acc, copy=False)
    r = 1.0 / xp.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    out *= r
    if norm is not None:
        norm[...] = out
    if rstd is not None:
        rstd[...] = r
    if w is not None:
        out *= w
        out += b
    return out


def _layernorm_backward_rows(dout, norm, rstd, w, dx):
    dn = np.multiply(dout, w, out=dx)
    c1 = dn.mean(axis=1, keepdims=True)
    c2 = np.einsum("ij,ij->i", dn, norm)[:, None] / dn.shape[1]
    dn -= c1
    dn -= norm * c2
    dn *= rstd


def layernorm_backward_add_(dout, norm, rstd, w, dh):
    """dh += LayerNorm backward of dout (2-d, rows of D) from the normalized input and rstd;
    returns the weight and bias gradients (D,), (D,). dout may be overwritten."""
    xp = get_xp(dout)
    nk = numba_kernels(dout)
    if nk is not None:  # one kernel, which also sums the weight and bias gradients
        D = dout.shape[1]
        return _sums_over_threads(lambda d, n, r, h, dw, db: nk.layernorm_backward_add(d, n, r, w, h, dw, db),
                                  (D, D), dout, norm, rstd, dh)
    dw, db = (dout * norm).sum(axis=0), dout.sum(axis=0)
    if xp is np:
        run_rows(lambda d, n, r: _layernorm_backward_rows(d, n, r, w, d), dout, norm, rstd)
    else:
        dn = xp.multiply(dout, w, out=dout)
        c1 = dn.mean(axis=1, keepdims=True)
        c2 = (dn * norm).mean(axis=1, keepdims=True)
        dn -= c1
        dn -= norm * c2
        dn *= rstd
    dh += dout
    return dw, db


def _sums_over_threads(kernel, sizes, *arrays):
    """run_rows(kernel, *arrays, *accumulators) for a Numba kernel that adds column sums into
    accumulators of the given sizes: each thread gets its own zeroed ones (shared ones would race),
    and their totals are returned."""
    partials = []

    def call(*rows):
        acc = [np.zeros(n, arrays[0].dtype) for n in sizes]
        kernel(*rows, *acc)
        partials.append(acc)
    run_rows(call, *arrays, chunk=None)
    return [sum(p[i] for p in partials) for i in range(len(sizes))]


def multiply_and_sum_(a, b, axis):
    """a <- a·b in place, and returns a.sum(axis): the gradient through GELU (a·gelu') and its
    bias's gradient. a is (R, C) with axis 0, or (B, R, C) with axis (0, 2)."""
    nk = numba_kernels(a)
    if nk is None or not (a.flags.c_contiguous and b.flags.c_contiguous):
        a *= b
        return a.sum(axis=axis)
    if axis == 0:  # column sums
        (sums,) = _sums_over_threads(lambda a_rows, b_rows, s: nk.multiply_and_sum(a_rows, b_rows, s, False),
                                     (a.shape[1],), a, b)
        return sums
    B, R, C = a.shape  # row sums of every image's (R, C), then summed over the images
    row_sums = np.zeros((B * R, 1), a.dtype)
    run_rows(lambda a_rows, b_rows, s: nk.multiply_and_sum(a_rows, b_rows, s[:, 0], True),
             a.reshape(B * R, C), b.reshape(B * R, C), row_sums, chunk=None)
    return row_sums.reshape(B, R).sum(axis=0)


# --- data parallelism: one share of the batch per core ---------------------------------------------
#
# OpenBLAS's worker threads spin for a while after each GEMM, so elementwise threads that
# run between GEMMs fight them for the cores. Splitting the batch instead, one share per
# core, each with single-threaded BLAS, keeps GEMMs at full speed (two single-threaded
# sgemms match one two-threaded sgemm) and makes all elementwise work parallel for free.

def _blas_single_thread():
    """A context that limits BLAS to one thread (threadpoolctl), or None if unavailable."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(1, user_api="blas")


def split_batch(B):
    """Row ranges, one per core, for a batch of B (a single range when B or the cores are 1)."""
    shares = max(1, min(num_threads(), B))
    bounds = [B * k // shares for k in range(shares + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(shares)]


def run_shares(fn, spans):
    """fn(start, stop) for each span, one per thread, BLAS single-threaded; returns the results."""
    if len(spans) == 1:
        return [fn(*spans[0])]
    limit = _blas_single_thread()
    if limit is None:  # no threadpoolctl: one share, BLAS threads as they are
        return [fn(spans[0][0], spans[-1][1])]

    def serial(span):
        _scratch.serial = True
        try:
            return fn(*span)
        finally:
            _scratch.serial = False

    with limit:
        futures = [threads.executor().submit(serial, span) for span in spans[1:]]
        first = serial(spans[0])
        return [first] + [f.result() for f in futures]


# --- inference -----------------------------------------------------------------------------------

TOKEN_GROUP = 2  # images per token-mixing matmul batch
CHANNEL_CHUNK_BYTES = 24 << 20  # channel-MLP hidden per chunk (2048 rows of B/16): big enough for full-speed GEMMs,
# small enough to stay in a desktop L3 and well under timm's (B·N, DC) hidden and its GELU copy


def predict(params, x, cfg):
    """Logits for images x (B, C, H, W); equal to model.predict up to float rounding."""
    x = check_input(params, x, cfg)
    xp = get_xp(x)
    if x.shape[0] == 0:  # no images: no rows to split (model.predict gives (0, K) too)
        return xp.zeros((0, cfg.num_classes), params["head.weight"].dtype)
    blocks = [{k[len(f"blocks.{i}."):]: v for k, v in params.items() if k.startswith(f"blocks.{i}.")}
              for i in range(cfg.num_blocks)]
    if xp is np and x.shape[0] < num_threads():
        # fewer images than cores: BLAS's own threads split each matmul; the elementwise work
        # stays in this thread (handed to the pool between GEMMs, it fights BLAS's spinning threads;
        # splitting each matmul by hand across the cores measured 40% slower than BLAS's threads)
        _scratch.serial = True
        try:
            return _predict_share(params, blocks, x, cfg)
        finally:
            _scratch.serial = False
    spans = split_batch(x.shape[0]) if xp is np else [(0, x.shape[0])]
    logits = run_shares(lambda a, b: _predict_share(params, blocks, x[a:b], cfg), spans)
    return logits[0] if len(logits) == 1 else xp.concatenate(logits)


def _predict_share(params, blocks, x, cfg):
    xp = get_xp(x)
    B, N, D = x.shape[0], cfg.num_patches, cfg.embed_dim
    M = B * N
    w = params["stem.proj.weight"]
    h = xp.matmul(patchify(x, cfg.patch_size).reshape(M, -1), w.reshape(D, -1).T)  # (M, D) residual stream
    h += params["stem.proj.bias"]
    y = xp.empty_like(h)  # (M, D) LayerNorm outputs
    on_cpu = xp is np
    group = min(B, TOKEN_GROUP) if on_cpu else B
    rows = min(M, max(64, CHANNEL_CHUNK_BYTES // (cfg.channel_hidden * h.itemsize))) if on_cpu else M
    rows = -(-M // -(-M // rows))  # equal chunks: a small last one would run a slow, thin GEMM
    # reused buffers: fresh large arrays would page-fault on every block
    token_hid = xp.empty((group, cfg.token_hidden, D), h.dtype)  # (g, DS, D)
    token_out = xp.empty((group, N, D), h.dtype)  # (g, N, D)
    channel_hid = xp.empty((rows, cfg.channel_hidden), h.dtype)  # (rows, DC)
    channel_out = xp.empty((rows, D), h.dtype)  # (rows, D)
    for p in blocks:
        # token mixing: h += W2 gelu(W1 LN(h) + b1) + b2, per group of images, on (N, D) slices
        layernorm_(h, y, p["norm1.weight"], p["norm1.bias"], cfg.ln_eps)
        y3, h3 = y.reshape(B, N, D), h.reshape(B, N, D)
        w1, b1 = p["mlp_tokens.fc1.weight"], p["mlp_tokens.fc1.bias"][:, None]
        w2, b2 = p["mlp_tokens.fc2.weight"], p["mlp_tokens.fc2.bias"][:, None]
        for g in range(0, B, group):
            k = min(group, B - g)
            hid = xp.matmul(w1, y3[g:g + k], out=token_hid[:k])  # (k, DS, D)
            if on_cpu:
                for j in range(k):
                    bias_gelu_(hid[j], b1, cfg.gelu)
            else:  # one kernel launch for the whole batch (the kernel broadcasts the (DS, 1) bias)
                bias_gelu_(hid, b1, cfg.gelu)
            out = xp.matmul(w2, hid, out=token_out[:k])  # (k, N, D)
            if on_cpu:
                for j in range(k):
                    add_bias_residual_(h3[g + j], out[j], b2)  # (N, D) += (N, D) + (N, 1)
            else:
                add_bias_residual_(h3[g:g + k], out, b2)
        # channel mixing: h += W2 gelu(W1 LN(h) + b1) + b2, a chunk of rows at a time
        layernorm_(h, y, p["norm2.weight"], p["norm2.bias"], cfg.ln_eps)
        w1, b1 = p["mlp_channels.fc1.weight"], p["mlp_channels.fc1.bias"]
        w2, b2 = p["mlp_channels.fc2.weight"], p["mlp_channels.fc2.bias"]
        for r in range(0, M, rows):
            k = min(rows, M - r)
            hid = xp.matmul(y[r:r + k], w1.T, out=channel_hid[:k])  # (k, DC)
            bias_gelu_(hid, b1, cfg.gelu)
            add_bias_residual_(h[r:r + k], xp.matmul(hid, w2.T, out=channel_out[:k]), b2)  # (k, D)
    layernorm_(h, y, params["norm.weight"], params["norm.bias"], cfg.ln_eps)
    pooled = y.reshape(B, N, D).mean(axis=1)  # (B, D)
    return pooled @ params["head.weight"].T + params["head.bias"]  # (B, K)


# --- training ------------------------------------------------------------------------------------

def forward(params, x, cfg, *, drop_path_rate=0.0, drop_rate=0.0, rng=None):
    """Training forward: logits (B, K) and the cache for `backward`. Same semantics (and the
    same random masks for the same rng) as model.mixer_forward."""
    x = check_input(params, x, cfg)
    xp = get_xp(x)
    B = x.shape[0]
    # draw the masks in model.mixer_forward's order, for the whole batch, before splitting it
    masks = {"blocks": [], "head": None}
    if rng is not None and drop_path_rate:
        for _ in range(cfg.num_blocks):
            masks["blocks"].append((layers._keep_mask((B, 1, 1), drop_path_rate, rng, x),
                                    layers._keep_mask((B, 1, 1), drop_path_rate, rng, x)))
    if rng is not None and drop_rate:
        masks["head"] = layers._keep_mask((B, cfg.embed_dim), drop_rate, rng, x)  # (B, D)
    spans = split_batch(B) if xp is np else [(0, B)]
    shares = run_shares(lambda a, b: _forward_share(params, x[a:b], cfg, _slice_masks(masks, a, b)), spans)
    logits = xp.concatenate([s[0] for s in shares]) if len(shares) > 1 else shares[0][0]  # (B, K)
    return logits, (spans, [s[1] for s in shares])


def _slice_masks(masks, a, b):
    return {"blocks": [(m1[a:b], m2[a:b]) for m1, m2 in masks["blocks"]],
            "head": None if masks["head"] is None else masks["head"][a:b]}


def _forward_share(params, x, cfg, masks):
    xp = get_xp(x)
    B, N, D = x.shape[0], cfg.num_patches, cfg.embed_dim
    M = B * N
    patches = patchify(x, cfg.patch_size).reshape(M, -1)  # (M, C·P·P)
    w = params["stem.proj.weight"]
    h = xp.matmul(patches, w.reshape(D, -1).T)  # (M, D)
    h += params["stem.proj.bias"]  # (M, D)
    blocks = []
    for i in range(cfg.num_blocks):
        p = {k[len(f"blocks.{i}."):]: v for k, v in params.items() if k.startswith(f"blocks.{i}.")}
        c = {"p": p}
        token_mask, channel_mask = masks["blocks"][i] if masks["blocks"] else (None, None)
        # token mixing
        c["n1"], c["r1"], y = xp.empty_like(h), xp.empty((M, 1), h.dtype), xp.empty_like(h)  # (M, D), (M, 1), (M, D)
        layernorm_(h, y, p["norm1.weight"], p["norm1.bias"], cfg.ln_eps, norm=c["n1"], rstd=c["r1"])
        y3 = y.reshape(B, N, D)  # not kept: backward rebuilds it from n1 (n·w + b)
        hid = xp.matmul(p["mlp_tokens.fc1.weight"], y3)  # (B, DS, D)
        c["dg1"] = xp.empty_like(hid)  # (B, DS, D) gelu'(hid)
        if xp is np:
            for j in range(B):  # per image: the (DS, 1) bias runs along rows
                bias_gelu_grad_(hid[j], p["mlp_tokens.fc1.bias"][:, None], c["dg1"][j], cfg.gelu)
        else:
            bias_gelu_grad_(hid, p["mlp_tokens.fc1.bias"][:, None], c["dg1"], cfg.gelu)
        c["a1"] = hid  # gelu output
        t = xp.matmul(p["mlp_tokens.fc2.weight"], hid)  # (B, N, D)
        t += p["mlp_tokens.fc2.bias"][:, None]  # (B, N, D)
        if token_mask is not None:
            t *= token_mask  # (B, N, D) stochastic depth
        c["mask1"] = token_mask
        h += t.reshape(M, D)  # in place: backward keeps the normalized copies, not h
        # channel mixing
        c["n2"], c["r2"], y = xp.empty_like(h), xp.empty((M, 1), h.dtype), xp.empty_like(h)  # (M, D), (M, 1), (M, D)
        layernorm_(h, y, p["norm2.weight"], p["norm2.bias"], cfg.ln_eps, norm=c["n2"], rstd=c["r2"])
        hid = xp.matmul(y, p["mlp_channels.fc1.weight"].T)  # (M, DC)
        c["dg2"] = xp.empty_like(hid)  # (M, DC) gelu'(hid)
        bias_gelu_grad_(hid, p["mlp_channels.fc1.bias"], c["dg2"], cfg.gelu)
        c["a2"] = hid  # (M, DC) gelu output
        t = xp.matmul(hid, p["mlp_channels.fc2.weight"].T)  # (M, D)
        t += p["mlp_channels.fc2.bias"]  # (M, D)
        if channel_mask is not None:
            t.reshape(B, N, D)[...] *= channel_mask  # (B, N, D)
        c["mask2"] = channel_mask
        h += t  # (M, D)
        blocks.append(c)
    n, r, y = xp.empty_like(h), xp.empty((M, 1), h.dtype), xp.empty_like(h)  # (M, D), (M, 1), (M, D)
    layernorm_(h, y, params["norm.weight"], params["norm.bias"], cfg.ln_eps, norm=n, rstd=r)
    pooled = y.reshape(B, N, D).mean(axis=1)  # (B, D)
    if masks["head"] is not None:
        pooled = pooled * masks["head"]  # (B, D)
    logits = pooled @ params["head.weight"].T + params["head.bias"]  # (B, K)
    return logits, (params, cfg, x.shape, patches, blocks, (n, r), pooled, masks["head"])


def backward(dlogits, cache, *, need_dx=False):
    """Gradients for every parameter (timm names), and dx (B, C, H, W) if need_dx: each share
    of the batch on its own core, then the shares' gradients summed. It consumes the cache."""
    spans, caches = cache
    xp = get_xp(dlogits)
    by_start = {span[0]: c for span, c in zip(spans, caches)}
    grads = GradientSum()
    shares = run_shares(lambda a, b: _backward_share(dlogits[a:b], by_start[a], need_dx, grads), spans)
    grads = grads.total
    dx = None
    if need_dx:
        dx = xp.concatenate(shares) if len(shares) > 1 else shares[0]  # (B, C, H, W)
    return grads, dx


class GradientSum:
    """Gradients summed over the shares as they arrive, so only one set is ever held."""

    def __init__(self):
        self.total, self.lock = {}, threading.Lock()

    def update(self, grads):
        for k, g in grads.items():
            with self.lock:
                if k not in self.total:
                    self.total[k] = g
                    continue
                self.total[k] += g


def _backward_share(dlogits, cache, need_dx, grads_sum):
    params, cfg, x_shape, patches, blocks, (n, r), pooled, drop = cache
    xp = get_xp(dlogits)
    B, N, D = x_shape[0], cfg.num_patches, cfg.embed_dim
    M = B * N
    grads = {"head.weight": dlogits.T @ pooled, "head.bias": dlogits.sum(axis=0)}  # (K, D), (K,)
    dpooled = dlogits @ params["head.weight"]  # (B, D)
    if drop is not None:
        dpooled = dpooled * drop  # (B, D)
    dy = xp.repeat(dpooled[:, None, :] / N, N, axis=1).reshape(M, D)  # (M, D) mean-pool backward
    dh = xp.zeros_like(dy)  # (M, D), and the final LayerNorm's weight and bias gradients (D,), (D,)
    grads["norm.weight"], grads["norm.bias"] = layernorm_backward_add_(dy, n, r, params["norm.weight"], dh)
    for i in reversed(range(len(blocks))):
        c = blocks.pop()  # each block's cache is freed once its gradients are done
        p, g = c["p"], {}
        # channel mixing
        dt = dh if c["mask2"] is None else (dh.reshape(B, N, D) * c["mask2"]).reshape(M, D)  # (M, D)
        g["mlp_channels.fc2.weight"] = dt.T @ c["a2"]  # (D, DC)
        g["mlp_channels.fc2.bias"] = dt.sum(axis=0)  # (D,)
        da = xp.matmul(dt, p["mlp_channels.fc2.weight"], out=c.pop("a2"))  # (M, DC) in a2's memory, now unused
        g["mlp_channels.fc1.bias"] = multiply_and_sum_(da, c["dg2"], 0)  # (DC,); da (M, DC) through GELU
        y = c["n2"] * p["norm2.weight"]  # (M, D) the LayerNorm output, rebuilt
        y += p["norm2.bias"]  # (M, D)
        g["mlp_channels.fc1.weight"] = da.T @ y  # (DC, D)
        dy = xp.matmul(da, p["mlp_channels.fc1.weight"])  # (M, D)
        # dh (M, D) += LayerNorm backward of dy: the residual branch joins the skip path
        g["norm2.weight"], g["norm2.bias"] = layernorm_backward_add_(dy, c["n2"], c["r2"], p["norm2.weight"], dh)
        # token mixing
        dt3 = dh.reshape(B, N, D)  # (B, N, D)
        if c["mask1"] is not None:
            dt3 = dt3 * c["mask1"]  # (B, N, D)
        g["mlp_tokens.fc2.weight"] = xp.matmul(dt3, c["a1"].transpose(0, 2, 1)).sum(axis=0)  # (N, DS)
        g["mlp_tokens.fc2.bias"] = dt3.sum(axis=(0, 2))  # (N,)
        da = xp.matmul(p["mlp_tokens.fc2.weight"].T, dt3, out=c.pop("a1"))  # (B, DS, D) in a1's memory
        g["mlp_tokens.fc1.bias"] = multiply_and_sum_(da, c["dg1"], (0, 2))  # (DS,); da (B, DS, D) through GELU
        y = c["n1"] * p["norm1.weight"]  # (M, D) the LayerNorm output, rebuilt
        y += p["norm1.bias"]  # (M, D)
        g["mlp_tokens.fc1.weight"] = xp.matmul(da, y.reshape(B, N, D).transpose(0, 2, 1)).sum(axis=0)  # (DS, N)
        dy = xp.matmul(p["mlp_tokens.fc1.weight"].T, da).reshape(M, D)  # (M, D)
        g["norm1.weight"], g["norm1.bias"] = layernorm_backward_add_(dy, c["n1"], c["r1"], p["norm1.weight"], dh)
        grads_sum.update({f"blocks.{i}.{k}": v for k, v in g.items()})
    w = params["stem.proj.weight"]
    grads["stem.proj.weight"] = (dh.T @ patches).reshape(w.shape)  # (D, C, P, P)
    grads["stem.proj.bias"] = dh.sum(axis=0)  # (D,)
    grads_sum.update(grads)
    return unpatchify((dh @ w.reshape(D, -1)).reshape(B, N, -1), x_shape, cfg.patch_size) if need_dx else None


# --- the optimizer -------------------------------------------------------------------------------

class AdamW(optim.AdamW):
    """optim.AdamW with each parameter's update fused into one pass (Numba), where it can be: the
    clear update makes about ten passes over each parameter and its two moments (54 ms of a
    1-second S/32 step). The updates of different parameters run on the thread pool."""

    def __init__(self, params, *args, run=None, **kwargs):
        super().__init__(params, *args, run=run or threads.pool_for(params), **kwargs)

    def update(self, name, p, g, state):
        nk = numba_kernels(p)
        if nk is None or not (p.flags.c_contiguous and g.flags.c_contiguous and g.dtype == p.dtype):
            return super().update(name, p, g, state)
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = np.zeros_like(p), np.zeros_like(p)
        beta1, beta2 = self.betas
        t = self.step_count
        nk.adamw_update(p.reshape(-1), g.reshape(-1), state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1),
                        1.0 - self.lr * self.decay_for(name), beta1, beta2, self.lr / (1.0 - beta1**t),
                        math.sqrt(1.0 - beta2**t), self.eps)
